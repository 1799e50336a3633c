"""Turning YAML and ``key=value`` overrides into a validated :class:`RunConfig`, and back.

Errors name the file, the line and the dotted key (``config.yaml:7: train.lr``). A relative path
in a YAML file is resolved against that file's folder (data paths and metric files by what they
look like, ``path=True`` options always); given on the command line, it is relative to the
working directory. A task sequence's ``continual.strategies`` are merged into the file's config
here, so each strategy is a full, resolved config (:func:`strategy_configs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from forgetless.config.schema import DatasetSpec, MethodConfigs, RunConfig, TaskConfig, names_template_file, type_name
from forgetless.config.secrets import redact_secrets
from forgetless.errors import ConfigError
from forgetless.registry import REGISTRY


class _Source:
    """Where a value came from, for error messages."""

    def __init__(self, file: Optional[str], lines: dict[str, int]):
        self.file = file
        self.lines = lines

    def where(self, key: str) -> str:
        if key in self.lines:
            return f"{self.file}:{self.lines[key]}: {key}" if self.file else key
        if key.startswith("<override>"):
            return key
        return f"{self.file}: {key}" if self.file else key


def _compose_with_lines(text: str, file: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and record the line of every mapping key, by dotted path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}{line}: invalid YAML ({problem}); check the indentation and quoting there") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def _convert(value: Any, tp: Any, key: str, src: _Source, base_dir: Path) -> Any:
    """Convert a YAML value to type ``tp``, raising ConfigError with the key's location."""
    origin = typing.get_origin(tp)
    bad = lambda: ConfigError(  # noqa: E731
        f"{src.where(key)}: expected {type_name(tp)}, got {value!r}; fix the value"
    )
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, src, base_dir)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads an unquoted no / off / yes / on as a boolean: give back the word a choice spells
            words = [c for c in choices if isinstance(c, str) and c.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))]
            if len(words) == 1:
                return words[0]
        if value not in choices:
            raise ConfigError(f"{src.where(key)}: must be {type_name(tp)}, got {value!r}")
        return value
    if tp is MethodConfigs:
        return _convert_methods(value, key, src, base_dir)
    if tp is DatasetSpec:
        if isinstance(value, str):
            value = {"path": value}
        spec = _build(DatasetSpec, value, key, src, base_dir)
        spec.path = _resolve_data_path(spec.path, base_dir)
        spec.metric = _resolve_metric_path(spec.metric, base_dir)
        return spec
    if tp is TaskConfig:
        task = _build(TaskConfig, value, key, src, base_dir)
        task.metric = _resolve_metric_path(task.metric, base_dir)
        return task
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src, base_dir)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]  # a single dataset where a list is allowed
        return [_convert(v, item, f"{key}[{i}]", src, base_dir) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _convert(v, item, f"{key}.{k}", src, base_dir) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            as_float = float(value)
        except ValueError:
            raise bad() from None
        if as_float != int(as_float):
            raise bad()
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad()
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _convert_methods(value: Any, key: str, src: _Source, base_dir: Path) -> MethodConfigs:
    """``{name: options}`` (or a list of names) -> {name: the method's config dataclass}."""
    if value is None:
        return MethodConfigs()
    if isinstance(value, list):
        value = {str(v): {} for v in value}
    if not isinstance(value, dict):
        raise ConfigError(f"{src.where(key)}: expected a mapping of method names to options, e.g. {{lora: {{r: 8}}}}")
    out = MethodConfigs()
    for name, options in value.items():
        sub = f"{key}.{name}"
        if name not in REGISTRY:
            close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{src.where(sub)}: unknown method {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
        if options is False:
            continue
        if options is True:
            options = {}
        out[name] = _build(REGISTRY[name].config, options, sub, src, base_dir)
    return out


def _build(cls: type, value: Any, key: str, src: _Source, base_dir: Path) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src.where(key) if key else src.file}: expected a mapping of {cls.__name__} fields, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in value.items():
        sub = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{src.where(sub)}: unknown key {k!r}{hint}")
        kwargs[k] = _convert(v, hints[k], sub, src, base_dir)
        kind = fields[k].metadata.get("path")
        if kind == "template":  # a chat template: a file name is resolved, the template text itself is not
            if names_template_file(kwargs[k]):
                kwargs[k] = _resolve_path_option(kwargs[k], base_dir, in_file=src.file is not None)
        elif kind:
            kwargs[k] = _resolve_path_option(kwargs[k], base_dir, in_file=src.file is not None)
    return cls(**kwargs)


PLUGIN_MODULE_PREFIX = "forgetless_plugin_"  # module names of plugin files (config.plugins)


def import_plugins(entries: Any, key: str, src: Optional["_Source"], base_dir: Path) -> list[str]:
    """Import each plugin (a ``.py`` file, resolved against ``base_dir``, or a module name) once;
    returns the entries with the files' paths made absolute. Importing registers their methods."""
    src = src or _Source(None, {})
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ConfigError(f"{src.where(key)}: expected a list of Python files or module names, e.g. [my_methods.py]")
    resolved = []
    for i, entry in enumerate(entries):
        where = src.where(f"{key}[{i}]")
        if entry.endswith(".py"):
            path = Path(entry).expanduser()
            path = (path if path.is_absolute() else base_dir / path).resolve()
            if not path.is_file():
                raise ConfigError(f"{where}: plugin file {entry} not found (relative to {base_dir}); check the path")
            name = PLUGIN_MODULE_PREFIX + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            entry = str(path)
            load = lambda: _exec_file(name, path)  # noqa: E731
        else:
            name = entry
            load = lambda: importlib.import_module(name)  # noqa: E731
        resolved.append(entry)
        if name in sys.modules:  # imported (and its methods registered) already
            continue
        try:
            load()
        except ConfigError:
            raise
        except Exception as e:  # the user's code: any error, reported in one line
            sys.modules.pop(name, None)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"{where}: importing {entry} failed: {type(e).__name__}: {first}") from None
    return resolved


def _exec_file(name: str, path: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _resolve_path_option(value: Any, base_dir: Path, in_file: bool) -> Any:
    """A ``path=True`` option's value (a path, a list of paths, or None) with relative paths resolved.

    From a file, a relative path is made absolute against the file's folder. From an override (or
    a plain dict) it is relative to the working directory: made absolute when it exists there, and
    otherwise kept as written, so that the error about a missing file shows what the user typed.
    ``~`` is the home folder; an empty path is left for the option's own validation to refuse.
    """
    if isinstance(value, list):
        return [_resolve_path_option(v, base_dir, in_file) for v in value]
    if not isinstance(value, str) or not value.strip():
        return value
    if value.startswith("~"):
        return os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    candidate = base_dir / value
    return str(candidate.resolve()) if in_file or candidate.exists() else value


def _resolve_data_path(path: str, base_dir: Path) -> str:
    """Make a relative file path absolute against ``base_dir``; leave hub ids and demo: names."""
    if not path or path.startswith("demo:") or os.path.isabs(path):
        return path
    candidate = base_dir / path
    looks_like_file = path.startswith(".") or Path(path).suffix.lower() in DATA_SUFFIXES or candidate.exists()
    return str(candidate.resolve()) if looks_like_file else path


DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}


def _resolve_metric_path(metric: Optional[str], base_dir: Path) -> Optional[str]:
    """``file.py:function`` with a relative file -> the file made absolute against ``base_dir``."""
    if not metric or ":" not in metric:
        return metric
    source, _, function = metric.rpartition(":")
    if not source.endswith(".py") or os.path.isabs(source):
        return metric
    return f"{(base_dir / source).resolve()}:{function}"


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML (``true``, ``3``, ``[a, b]``)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: the key is empty; write key=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML config (optional), apply ``key=value`` overrides, validate, return a RunConfig."""
    data: dict = {}
    lines: dict[str, int] = {}
    file = None
    base_dir = Path.cwd()
    if path is not None:
        file = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{file}: config file not found; check the path")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not a UTF-8 text file; save the config as UTF-8 YAML") from None
        loaded, lines = _compose_with_lines(text, file)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping (model:, data:, train:, ...)")
        data = loaded
        base_dir = p.resolve().parent
    src = _Source(file, lines)
    parsed = parse_overrides(overrides) if overrides else []
    # Plugins first: they register the methods that `methods:` (in the file or an override) may name.
    if "plugins" in data:
        data["plugins"] = import_plugins(data["plugins"], "plugins", src, base_dir)
    # An override replaces the file's list; it is saved resolved, so children and resumes import the same files.
    parsed = [(k, import_plugins(v, "override plugins", _Source(None, {}), Path.cwd()) if k == "plugins" else v) for k, v in parsed]
    cfg = _build(RunConfig, data, "", src, base_dir)
    for key, value in parsed:
        cfg = _apply_override(cfg, key, value)
    cfg.validate()
    for name in list(cfg.continual.strategies):
        cfg.continual.strategies[name] = _resolve_strategy(cfg, name, src, base_dir)
    return cfg


class _PrefixedSource(_Source):
    """Locations of keys that sit under ``prefix`` in the file (a strategy's overrides)."""

    def __init__(self, src: _Source, prefix: str):
        super().__init__(src.file, src.lines)
        self.prefix = prefix

    def where(self, key: str) -> str:
        return super().where(self.prefix + key)


STRATEGY_SECTIONS = ("model", "data", "train", "eval", "output", "methods")


def _resolve_strategy(cfg: RunConfig, name: str, src: _Source, base_dir: Path) -> dict:
    """A strategy's overrides merged into the file's config, validated; returns the merged sections.

    ``methods`` replaces the file's methods (a strategy is a set of methods); every other section
    merges key by key. The result holds resolved paths, so it rebuilds identically anywhere.
    """
    where = f"continual.strategies.{name}"
    if not name or not all(c.isalnum() or c in "-_.+" for c in name):
        raise ConfigError(f"{src.where(where)}: a strategy name must be letters, digits, '-', '_', '.' or '+', got {name!r}")
    over = cfg.continual.strategies[name]
    if over is None:
        over = {}
    if not isinstance(over, dict):
        raise ConfigError(f"{src.where(where)}: expected a mapping of config sections (e.g. methods: {{ewc: {{}}}}), got {over!r}")
    unknown = [k for k in over if k not in STRATEGY_SECTIONS]
    if unknown:
        raise ConfigError(f"{src.where(f'{where}.{unknown[0]}')}: a strategy may set {', '.join(STRATEGY_SECTIONS)}; not {unknown[0]!r}")
    raw = {k: v for k, v in to_dict(cfg).items() if k in STRATEGY_SECTIONS}
    merged = _deep_merge(raw, {k: v for k, v in over.items() if k != "methods"})
    if "methods" in over:
        merged["methods"] = over["methods"] if over["methods"] is not None else {}
    built = _build(RunConfig, merged, "", _PrefixedSource(src, where + "."), base_dir)
    built.tasks = cfg.tasks
    try:
        built.validate()
    except ConfigError as e:
        raise ConfigError(f"{src.where(where)}: {e}") from None
    return {k: v for k, v in to_dict(built).items() if k in STRATEGY_SECTIONS}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> RunConfig:
    """A validated RunConfig from a plain dict such as ``to_dict`` gives (paths already resolved)."""
    if data.get("plugins"):
        import_plugins(data["plugins"], "plugins", _Source(None, {}), Path.cwd())
    cfg = _build(RunConfig, data, "", _Source(None, {}), Path.cwd())
    cfg.validate()
    return cfg


def strategy_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """Every strategy of a task-sequence config as its own RunConfig (the file's methods if none)."""
    if not cfg.continual.strategies:
        return {default_strategy_name(cfg): cfg}
    out = {}
    for name, sections in cfg.continual.strategies.items():
        built = _build(RunConfig, dict(sections), "", _Source(None, {}), Path.cwd())
        built.tasks, built.plugins = cfg.tasks, list(cfg.plugins)
        out[name] = built
    return out


def default_strategy_name(cfg: RunConfig) -> str:
    return "+".join(cfg.methods) if cfg.methods else "full-ft"


def _apply_override(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """Set one dotted key on an existing config, converting and validating it like YAML."""
    raw = to_dict(cfg)
    # Paths already resolved stay absolute; a new path on the command line is relative to cwd.
    _check_key(key)
    _set_dotted(raw, key, value)
    return _build(RunConfig, raw, "", _Source(None, {}), Path.cwd())


def _check_key(key: str) -> None:
    """Raise a helpful error for an override key that names no field."""
    cls: Any = RunConfig
    walked = []
    for part in key.split("."):
        walked.append(part)
        if cls is None:
            return
        if cls is MethodConfigs:
            if part not in REGISTRY:
                close = difflib.get_close_matches(part, list(REGISTRY), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"override {'.'.join(walked)}: unknown method {part!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
            cls = REGISTRY[part].config
            continue
        if not dataclasses.is_dataclass(cls):
            origin = typing.get_origin(cls)
            if origin is dict:  # free-form names (data.eval.NAME)
                cls = typing.get_args(cls)[1]
                continue
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            names = list(hints)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"override {'.'.join(walked)}: unknown key {part!r}{hint}")
        cls = hints[part]
        origin = typing.get_origin(cls)
        if origin in (Union, types.UnionType):
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
        if typing.get_origin(cls) is list and typing.get_args(cls)[0] is DatasetSpec:
            cls = None


def to_dict(cfg: Any) -> Any:
    """A plain dict (YAML-ready) of a config dataclass."""
    return _plain(dataclasses.asdict(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (it loads back to the same RunConfig, unless a value held
    a secret: see :func:`redact_secrets`)."""
    Path(path).write_text(yaml.safe_dump(redact_secrets(to_dict(cfg)), sort_keys=False), encoding="utf-8")


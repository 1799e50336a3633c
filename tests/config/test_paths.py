"""Path-valued options (``option(..., path=True)``): relative to the YAML file, or to the working
directory on the command line, wherever the option is declared."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Union

import pytest
import yaml

import forgetless  # noqa: F401  (registers the built-in methods)
from forgetless.config import MethodConfigs, RunConfig, load_config, strategy_configs, to_dict
from forgetless.errors import ConfigError
from forgetless.registry import REGISTRY

STATE_FILE = "ewc_state.safetensors"


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory, away from the YAML file's folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_method_paths_in_a_yaml_file_are_relative_to_its_folder(tmp_path, elsewhere):
    folder = tmp_path / "configs"
    (folder / "runs" / "first").mkdir(parents=True)
    (folder / "runs" / "first" / STATE_FILE).write_bytes(b"")
    (folder / "runs" / "second").mkdir()

    ewc = load_config(write(folder, "data: {train: demo:capitals}\nmethods: {ewc: {previous_state: runs/first}}\n"))
    assert ewc.methods["ewc"].previous_state == str(folder / "runs" / "first")

    expansion = load_config(write(folder, "data: {train: demo:capitals}\nmethods: {expansion: {previous: ./runs/first}}\n"))
    assert expansion.methods["expansion"].previous == str(folder / "runs" / "first")

    olora = load_config(write(folder, "data: {train: demo:capitals}\nmethods: {olora: {previous: [runs/first, runs/second]}}\n"))
    assert olora.methods["olora"].previous == [str(folder / "runs" / "first"), str(folder / "runs" / "second")]


def test_a_missing_file_is_looked_for_next_to_the_yaml(tmp_path, elsewhere):
    (elsewhere / "runs" / "first").mkdir(parents=True)
    (elsewhere / "runs" / "first" / STATE_FILE).write_bytes(b"")  # only in the working directory
    p = write(tmp_path / "configs", "data: {train: demo:capitals}\nmethods: {ewc: {previous_state: runs/first}}\n")
    with pytest.raises(ConfigError, match=f"methods.ewc.previous_state: {tmp_path / 'configs' / 'runs' / 'first'} not found"):
        load_config(p)


def test_an_override_path_is_relative_to_the_working_directory(tmp_path, elsewhere):
    (elsewhere / "runs" / "first").mkdir(parents=True)
    (elsewhere / "runs" / "first" / STATE_FILE).write_bytes(b"")
    p = write(tmp_path / "configs", "data: {train: demo:capitals}\nmethods: {ewc: {}}\n")
    cfg = load_config(p, ["methods.ewc.previous_state=runs/first"])
    assert cfg.methods["ewc"].previous_state == str(elsewhere / "runs" / "first")
    cfg = load_config(None, ["data.train=demo:capitals", f"methods.ewc.previous_state={elsewhere / 'runs' / 'first'}"])
    assert cfg.methods["ewc"].previous_state == str(elsewhere / "runs" / "first")


def test_null_and_absolute_paths_stay_as_they_are(tmp_path, elsewhere):
    absolute = tmp_path / "abs" / "run"
    p = write(tmp_path / "configs", f"data: {{train: demo:capitals}}\nmethods: {{ewc: {{previous_state: null}}, olora: {{previous: [{absolute}]}}}}\n")
    cfg = load_config(p)
    assert cfg.methods["ewc"].previous_state is None
    assert cfg.methods["olora"].previous == [str(absolute)]


def test_strategy_paths_are_relative_to_the_yaml_folder(tmp_path, elsewhere):
    folder = tmp_path / "configs"
    (folder / "prev").mkdir(parents=True)
    (folder / "prev" / STATE_FILE).write_bytes(b"")
    p = write(folder, (
        "tasks: [{name: a, train: demo:capitals}]\n"
        "continual: {strategies: {online: {methods: {ewc: {previous_state: prev}}}, plain: {methods: {}}}}\n"
    ))
    strategies = strategy_configs(load_config(p))
    assert strategies["online"].methods["ewc"].previous_state == str(folder / "prev")


# --------------------------------------------------------------------------------------------
# Every path option, found in the schema and in every registered method's config
# --------------------------------------------------------------------------------------------


def _inner(tp: Any) -> Any:
    """``Optional[X]`` -> X."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def path_options(cls: type = RunConfig, steps: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(steps, type) of every ``path=True`` field reachable from ``cls``. A step is a field name,
    ``[]`` (one item of a list) or ``{}`` (one value of a mapping, named ``x``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, here = hints[f.name], steps + (f.name,)
        if f.metadata.get("path") is True:
            yield here, tp
            continue
        yield from _descend(tp, here)


def _descend(tp: Any, steps: tuple) -> Iterator[tuple[tuple, Any]]:
    tp = _inner(tp)
    if tp is MethodConfigs:
        for name, spec in REGISTRY.items():
            yield from path_options(spec.config, steps + (name,))
    elif dataclasses.is_dataclass(tp):
        yield from path_options(tp, steps)
    elif typing.get_origin(tp) is list:
        yield from _descend(typing.get_args(tp)[0], steps + ("[]",))
    elif typing.get_origin(tp) is dict:
        yield from _descend(typing.get_args(tp)[1], steps + ("{}",))


def nest(steps: tuple, value: Any) -> Any:
    if not steps:
        return value
    head, rest = steps[0], steps[1:]
    if head == "[]":
        return [nest(rest, value)]
    return {"x" if head == "{}" else head: nest(rest, value)}


def pick(data: Any, steps: tuple) -> Any:
    for step in steps:
        data = data[0] if step == "[]" else data["x" if step == "{}" else step]
    return data


def key_of(steps: tuple) -> str:
    """The dotted override key (no list may lie on the way: overrides cannot index lists)."""
    return ".".join("x" if s == "{}" else s for s in steps if s != "[]")


OPTIONS = sorted(path_options(), key=lambda o: key_of(o[0]))


def test_the_known_path_options_are_found():
    found = {key_of(steps) for steps, _ in OPTIONS}
    assert {"eval.harness.include_path", "methods.ewc.previous_state", "methods.expansion.previous", "methods.olora.previous"} <= found


@pytest.fixture
def unvalidated(monkeypatch):
    """Path resolution on its own: an option's validation may ask for more (files of a kind, data)."""
    monkeypatch.setattr(RunConfig, "validate", lambda self: None)


def _given(tp: Any, *paths: str) -> Any:
    return list(paths) if typing.get_origin(_inner(tp)) is list else paths[0]


@pytest.mark.parametrize("steps, tp", OPTIONS, ids=[key_of(s) for s, _ in OPTIONS])
def test_every_path_option_in_a_yaml_file_is_relative_to_its_folder(steps, tp, tmp_path, elsewhere, unvalidated):
    folder = tmp_path / "configs"
    p = write(folder, yaml.safe_dump(nest(steps, _given(tp, "rel/a", "../rel/b"))))
    got = pick(to_dict(load_config(p)), steps)
    assert got == _given(tp, str(folder / "rel" / "a"), str(tmp_path / "rel" / "b"))


OVERRIDABLE = [o for o in OPTIONS if "[]" not in o[0]]


@pytest.mark.parametrize("steps, tp", OVERRIDABLE, ids=[key_of(s) for s, _ in OVERRIDABLE])
def test_every_path_option_on_the_command_line_is_relative_to_the_working_directory(steps, tp, elsewhere, unvalidated):
    (elsewhere / "here").mkdir()

    def loaded(path: str) -> Any:
        value = yaml.safe_dump(_given(tp, path), default_flow_style=True).strip().removesuffix("...").strip()
        return pick(to_dict(load_config(None, [f"{key_of(steps)}={value}"])), steps)

    assert loaded("here") == _given(tp, str(elsewhere / "here"))
    # a path that does not exist is kept as written (relative to the working directory), so the
    # option's "not found" error shows what was typed
    assert loaded("missing") == _given(tp, "missing")


def test_a_chat_template_file_is_relative_to_the_yaml_and_template_text_is_kept(tmp_path, unvalidated):
    folder = tmp_path / "configs"
    got = load_config(write(folder, yaml.safe_dump({"data": {"chat_template": "templates/chat.jinja"}}))).data.chat_template
    assert got == str(folder / "templates" / "chat.jinja")
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert load_config(write(folder, yaml.safe_dump({"data": {"chat_template": text}}))).data.chat_template == text
    assert load_config(write(folder, yaml.safe_dump({"data": {"chat_template": "chatml"}}))).data.chat_template == "chatml"

"""The configuration reference (``docs/CONFIG.md``, ``forgetless config --markdown``), generated
from the schema's fields and from every registered method's config.

``tests/test_config.py::test_reference_doc_is_current`` fails when docs/CONFIG.md is stale;
regenerate it with ``forgetless config --markdown > docs/CONFIG.md``.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml

from forgetless.config.schema import PATH_NOTE, DatasetSpec, MethodConfigs, RunConfig, type_name
from forgetless.registry import REGISTRY


def reference(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, help) for every field, depth first."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", _help(f)))
            rows.extend(reference(tp, key + "."))
            continue
        if tp is MethodConfigs:
            rows.append((key, "section", "", _help(f)))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        rows.append((key, type_name(tp), yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("..."), _help(f)))
    return rows


def _help(f: dataclasses.Field) -> str:
    help_ = f.metadata.get("help", "")
    return f"{help_} {PATH_NOTE}" if f.metadata.get("path") else help_


def reference_markdown() -> str:
    """docs/CONFIG.md: every config key with its type, default and meaning."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `forgetless/config/` (`forgetless config --markdown`). A YAML config mirrors",
        "these sections; any key can be overridden on the command line as `section.key=value`.",
        "Datasets (`data.train`, `data.eval.NAME`, `data.keep.NAME`) are either a path string or a",
        "mapping with the fields of `DatasetSpec` below.",
        "",
        f"Keys whose meaning ends in *{PATH_NOTE}* take a file or folder (or a list of",
        "them): a relative one in a YAML file is resolved against that file's folder, one given on the",
        "command line against the working directory. Data paths and scoring files",
        "(`path/to/file.py:function`) follow the same rule; a hub dataset id or `demo:NAME` stays as it is.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, tp, default, help_ in reference():
        if tp == "section":
            out.append(f"| **{key}** | | | {help_} |")
        else:
            out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
    out += ["", "## DatasetSpec", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, help_ in reference(DatasetSpec):
        out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
    out += ["", "## Methods", "", "Enable a method with `methods.NAME=true` (defaults) or set its options, e.g.",
            "`methods.lora.r=16`. Methods combine; each is one file under `forgetless/methods/`.", ""]
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        out += [f"### `{name}`", "", spec.summary, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, help_ in reference(spec.config, f"methods.{name}."):
            out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"

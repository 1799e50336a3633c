"""Run configuration: documented dataclasses, YAML files and ``key=value`` overrides.

A YAML file mirrors :class:`RunConfig`; every field carries its help text in
``metadata["help"]``, which is what ``docs/CONFIG.md`` is generated from. Validation happens while
the YAML is turned into dataclasses, so an error names the file, the line and the field
(``train.lr``) and says what is expected.

One module per job; they import each other only downward, and nothing from forgetless but
``errors`` and ``registry`` (the bottom layer: see tests/test_layers.py):

- :mod:`~forgetless.config.schema`: :func:`option` and the dataclasses, with their ``validate``.
- :mod:`~forgetless.config.loader` (imports schema, secrets): YAML with line numbers, overrides,
  strategies, saving.
- :mod:`~forgetless.config.secrets` (imports nothing): redaction of access tokens before anything
  is written.
- :mod:`~forgetless.config.reference` (imports schema): the reference documentation.

Paths. A relative path in a YAML file is resolved against that file's folder (so a config and its
data can move together); a path given as a command-line override is relative to the working
directory (made absolute when it exists there; a missing one is kept as typed, for the error).
This holds for every option declared ``option(..., path=True)`` (a path or a list of paths, each
resolved; null stays null), and for data paths (``DatasetSpec.path``, unless it is a hub id or
``demo:NAME``) and scoring files (``file.py:function``), which are recognised by their form.
``model.name_or_path`` (often a hub id) and ``output.dir`` (where the run goes) are relative to
the working directory wherever they are given.

Every name below was importable from the single-module ``forgetless.config`` and still is.
"""

from forgetless.config.loader import (
    DATA_SUFFIXES,
    STRATEGY_SECTIONS,
    config_from_dict,
    default_strategy_name,
    load_config,
    parse_overrides,
    save_config,
    strategy_configs,
    to_dict,
)
from forgetless.config.reference import reference, reference_markdown
from forgetless.config.schema import (
    ContinualConfig,
    DataConfig,
    DatasetSpec,
    BudgetConfig,
    TuneConfig,
    EvalConfig,
    HarnessConfig,
    MethodConfigs,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TaskConfig,
    TinyModelConfig,
    TrainConfig,
    option,
)
from forgetless.config.secrets import REDACTED, SECRET_ENV_VARS, redact_secrets

__all__ = [
    "DATA_SUFFIXES",
    "REDACTED",
    "SECRET_ENV_VARS",
    "STRATEGY_SECTIONS",
    "ContinualConfig",
    "DataConfig",
    "DatasetSpec",
    "BudgetConfig",
    "TuneConfig",
    "EvalConfig",
    "HarnessConfig",
    "MethodConfigs",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TaskConfig",
    "TinyModelConfig",
    "TrainConfig",
    "config_from_dict",
    "default_strategy_name",
    "load_config",
    "option",
    "parse_overrides",
    "redact_secrets",
    "reference",
    "reference_markdown",
    "save_config",
    "strategy_configs",
    "to_dict",
]

"""A model with non-linear adapters as a standalone transformers model (``trust_remote_code``).

Bottleneck adapters and routed LoRA experts are not linear in the base weights, so no merge folds
them in. ``forgetless merge`` writes them the way the hub ships architectures transformers does
not have: the weights (base and adapters) in ``model.safetensors``, ``config.json`` naming the
class in ``auto_map``, and ``modeling_forgetless.py`` beside them, which subclasses the base's
transformers class and attaches the adapters in ``__init__``. The adapter code in that file is the
kind's own (its source, copied), so the model computes what it computed in forgetless; the file
needs torch and transformers only, not forgetless::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
"""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.errors import UserError

MODELING_FILE = "modeling_forgetless.py"

_TEMPLATE = '''"""{base} with forgetless {kind} adapters, as written by `forgetless merge`.

Load it with transformers alone (no forgetless needed):

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)

The adapters are not linear in the base weights, so they cannot be folded into them; the code
below (forgetless's own) attaches them to the base architecture, and the weights file holds both.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base} as _Base

{source}


class {cls}(_Base):
    """{base} with the {kind} adapters of config.forgetless_adapter attached."""

    def __init__(self, config):
        super().__init__(config)
        attach(self, config.forgetless_adapter["settings"])
'''


def export_remote_code(model, tokenizer, out: Path, kind: str, source: str, settings: dict) -> str:
    """Write ``model`` (base + adapters) to ``out`` as a trust_remote_code model; returns its class name."""
    import transformers

    base = type(model).__name__
    if getattr(transformers, base, None) is not type(model):
        raise UserError(f"merge: the base architecture {base} is not one of transformers' own classes, so its adapters cannot be exported")
    cls = "Forgetless" + "".join(p.capitalize() for p in kind.split("_")) + base
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["architectures"] = [cls]
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{cls}"}
    config["forgetless_adapter"] = {"kind": kind, "settings": settings}
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / MODELING_FILE).write_text(_TEMPLATE.format(base=base, kind=kind, cls=cls, source=source.strip()), encoding="utf-8")
    return cls


def sources(*objects) -> str:
    """The source of module-level constants' assignments (given as strings) and of functions / classes."""
    import inspect

    return "\n\n\n".join(o if isinstance(o, str) else inspect.getsource(o).strip() for o in objects)

"""User scoring functions: ``metric: path/to/file.py:function`` or ``package.module:function``.

The function is called once per scored set::

    def my_score(predictions: list[str], references: list[str], records: list[dict]) -> float | dict:
        ...

``predictions`` are the model's greedy generations (the same decoding as exact match:
``eval.max_new_tokens``, cut at the first end-of-turn token), ``references`` the gold completions
(the last assistant message for chat records, the correct choice for multiple-choice records) and
``records`` the raw records they came from, in the same order. It returns the set's score, or a
dict with ``"score"`` and any other numbers, all of which are logged beside the built-in scores.
Every way this can go wrong becomes one UserError line naming the set and the function.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path
from typing import Callable

from forgetless.errors import UserError

# Keys a scoring function's extra numbers may not take: the built-in scores of every set.
RESERVED = {"examples", "target_tokens", "loss", "perplexity", "token_accuracy", "exact_match", "contains", "mc_accuracy", "mc_accuracy_norm"}

_loaded: dict[str, Callable] = {}


def load_scoring_function(spec: str, set_name: str) -> Callable:
    """The function named by ``spec`` (``file.py:function`` or ``module:function``), imported once."""
    if spec in _loaded:
        return _loaded[spec]
    source, _, name = spec.rpartition(":")
    label = f"set {set_name!r}: scoring function {spec}"
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{label}: file {source} not found; check the path")
        module_name = "forgetless_user_metric_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error it raises on import is theirs
            sys.modules.pop(module_name, None)
            raise UserError(f"{label}: importing {source} failed ({_one_line(e)}); fix the file") from None
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as e:
            raise UserError(f"{label}: module {e.name!r} not found; install it, or give a file as path/to/file.py:{name}") from None
        except Exception as e:
            raise UserError(f"{label}: importing {source} failed ({_one_line(e)}); fix the module") from None
    fn = getattr(module, name, None)
    if fn is None:
        found = ", ".join(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:200]
        raise UserError(f"{label}: {source} has no function {name!r} (it has: {found or 'none'}); fix the name")
    if not callable(fn):
        raise UserError(f"{label}: {source}.{name} is a {type(fn).__name__}, not a function")
    _loaded[spec] = fn
    return fn


def run_scoring_function(spec: str, set_name: str, predictions: list[str], references: list[str], records: list[dict]) -> dict[str, float]:
    """Call the user's function; returns ``{"score": ..., **extras}`` or raises a one-line UserError."""
    fn = load_scoring_function(spec, set_name)
    label = f"set {set_name!r}: scoring function {spec}"
    try:
        value = fn(list(predictions), list(references), list(records))
    except Exception as e:  # the user's code
        raise UserError(f"{label} raised {_one_line(e)}; fix the function") from None
    if isinstance(value, dict):
        if "score" not in value:
            raise UserError(f"{label} returned a dict without 'score' (keys: {', '.join(map(str, value))[:120]}); add a 'score' entry")
        out = {}
        for key, v in value.items():
            key = str(key)
            if key in RESERVED:
                raise UserError(f"{label} returned {key!r}, a name forgetless reports itself; rename it")
            out[key] = _number(v, f"{label} returned {key}={v!r}")
        return out
    return {"score": _number(value, f"{label} returned {value!r}")}


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{what}, not a number; return a float or a dict of floats with a 'score'")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{what}, not a finite number; return a finite float")
    return value


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__

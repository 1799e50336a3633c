"""``forgetless eval``: score a model or a run directory on any number of datasets."""

from __future__ import annotations

from typing import Optional, Union

import torch

from forgetless.config import DataConfig, DatasetSpec, ModelConfig
from forgetless.data.encoding import encode_dataset
from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.eval.headline import check_metric
from forgetless.eval.scoring import score_examples
from forgetless.eval.sets import make_eval_set
from forgetless.errors import UserError
from forgetless.models import load_model, load_tokenizer
from forgetless.progress import eval_progress


def load_eval_sets(
    tokenizer,
    data: dict[str, Union[str, DatasetSpec]],
    *,
    max_examples: Optional[int] = None,
    max_length: int = 1024,
    chat_template: Optional[str] = None,
) -> dict[str, list[Example]]:
    """Tokenized examples of each named dataset (a path string or a DatasetSpec)."""
    encoder = Encoder(tokenizer, DataConfig(max_length=max_length, chat_template=chat_template))
    sets = {}
    for name, spec in data.items():
        spec = DatasetSpec(path=spec) if isinstance(spec, str) else spec
        examples, _ = encode_dataset(encoder, [spec])
        sets[name] = examples[:max_examples] if max_examples else examples
    return sets


def score_sets(model, tokenizer, sets: dict[str, list[Example]], *, batch_size: int = 16, generation: bool = True,
               max_new_tokens: Optional[int] = None, score_eos: bool = False, progress: bool = False, label: str = "eval",
               metrics: Optional[dict[str, str]] = None) -> dict[str, dict[str, float]]:
    """Scores of an in-memory model on each set (see forgetless.eval.scoring).

    ``metrics`` names the headline metric ("score") of some sets; the others get their natural one.
    ``max_new_tokens`` None: each set's longest reference + a few tokens. ``score_eos``: also score
    the end-of-text token appended to text and prompt/completion records.
    """
    device = next(model.parameters()).device
    results = {}
    for name, examples in sets.items():
        with eval_progress(len(examples), f"{label} {name}", progress) as advance:
            results[name] = score_examples(
                model, examples, tokenizer, batch_size=batch_size, generation=generation,
                max_new_tokens=max_new_tokens, score_eos=score_eos, device=device, on_batch=advance,
                metric=(metrics or {}).get(name), name=name,
            )
    return results


def evaluate(model: str, data: dict[str, Union[str, DatasetSpec]], **options) -> dict[str, dict[str, float]]:
    """Scores of ``model`` (a run directory, a model directory, a hub id, or 'tiny') on each named dataset.

    Returns ``{name: {"loss", "perplexity", "token_accuracy", "exact_match", "examples", "score", ...}}``;
    ``score`` is the set's ``metrics[name]`` (or its DatasetSpec's ``metric``, or the data's natural headline).
    ``options`` are those of :func:`evaluate_with_metrics` (batch_size, max_examples, generation, ...).
    """
    return evaluate_with_metrics(model, data, **options)[0]


def evaluate_with_metrics(
    model: str,
    data: dict[str, Union[str, DatasetSpec]],
    *,
    batch_size: int = 16,
    max_examples: Optional[int] = None,
    generation: bool = True,
    max_new_tokens: Optional[int] = None,
    score_eos: bool = False,
    max_length: int = 1024,
    chat_template: Optional[str] = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    metrics: Optional[dict[str, str]] = None,
    dtype: str = "float32",
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """:func:`evaluate`, and the metric each set's ``score`` is (resolved and checked before the model loads).
    ``dtype``: as ``model.dtype`` (``auto`` keeps the checkpoint's)."""
    chosen = dict(metrics or {})
    for name, spec in data.items():
        if name not in chosen and isinstance(spec, DatasetSpec) and spec.metric:
            chosen[name] = spec.metric
    unknown = sorted(set(chosen) - set(data))
    if unknown:
        raise UserError(f"metric for {unknown[0]!r}: no dataset of that name; name one of {', '.join(data)}")
    for name, metric in chosen.items():
        check_metric(metric, f"metric of {name}")
    model_cfg = ModelConfig(name_or_path=str(model), trust_remote_code=trust_remote_code, dtype=dtype)
    tokenizer = load_tokenizer(model_cfg)
    sets = load_eval_sets(tokenizer, data, max_examples=max_examples, max_length=max_length, chat_template=chat_template)
    resolved = {
        name: make_eval_set(name, "new", examples, EncodeStats(), chosen.get(name), generation, f"set {name}").metric
        for name, examples in sets.items()
    }
    lm = load_model(model_cfg, tokenizer)
    lm.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    results = score_sets(lm, tokenizer, sets, batch_size=batch_size, generation=generation, max_new_tokens=max_new_tokens,
                         score_eos=score_eos, progress=progress, metrics=resolved)
    return results, resolved

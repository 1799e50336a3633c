"""The headline score of an evaluation set: which metric, which direction, and its value.

Every scored set reports one number, ``score``, next to its other scores. Which metric it is comes
from ``DatasetSpec.metric`` (``data.eval.NAME.metric``):

- ``exact_match``: share of greedy generations equal to the reference (normalised).
- ``contains``: share of greedy generations that contain the reference as whole words (both
  normalised): a chat model's "The capital of Kenya is Nairobi." is right for "Nairobi".
- ``token_accuracy``: share of target tokens predicted by the argmax.
- ``loss``, ``perplexity``: mean cross-entropy of the target tokens and its exponential
  (lower is better).
- ``multiple_choice``: accuracy of the choice with the highest log-likelihood (lm-eval's ``acc``);
  ``multiple_choice_norm``: the same with each log-likelihood divided by the choice's length in
  characters (lm-eval's ``acc_norm``).
- ``path/to/file.py:function`` or ``package.module:function``: a user scoring function (see
  :mod:`forgetless.eval.custom`), assumed higher-is-better.

With no metric the set's natural headline is used: ``multiple_choice`` for multiple-choice records,
else ``exact_match`` when generation is on and the records have prompts (prompt/completion, chat),
else ``token_accuracy``. Everything here is a pure function of names and result dicts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from forgetless.config.schema import check_metric  # noqa: F401  (the config validates metric names; eval uses the same check)
from forgetless.errors import UserError

# metric name -> the key of the result dict that holds its value
RESULT_KEYS = {
    "exact_match": "exact_match",
    "contains": "contains",
    "token_accuracy": "token_accuracy",
    "loss": "loss",
    "perplexity": "perplexity",
    "multiple_choice": "mc_accuracy",
    "multiple_choice_norm": "mc_accuracy_norm",
}
HIGHER_IS_BETTER = {
    "exact_match": True,
    "contains": True,
    "token_accuracy": True,
    "loss": False,
    "perplexity": False,
    "multiple_choice": True,
    "multiple_choice_norm": True,
}
# built-in metrics of greedy generations (the set is decoded)
GENERATED = ("exact_match", "contains")
# lm-evaluation-harness metrics (harness/<task> sets) where lower is better; its others are higher-is-better.
HARNESS_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def is_scoring_function(metric: str) -> bool:
    """``file.py:function`` or ``package.module:function`` (a user's function, not a built-in name)."""
    return ":" in metric


def higher_is_better(metric: str) -> bool:
    """Direction of a metric: loss and perplexity are lower-is-better; user functions are assumed higher."""
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    return is_scoring_function(metric) or metric.split(",")[0] not in HARNESS_LOWER_IS_BETTER


def default_metric(examples: Sequence, generation: bool) -> str:
    """The natural headline of a set of :class:`~forgetless.data.formats.Example`."""
    if any(e.choices is not None for e in examples):
        return "multiple_choice"
    if generation and any(e.prompt_ids and e.reference is not None for e in examples):
        return "exact_match"
    return "token_accuracy"


def check_metric_fits(metric: str, examples: Sequence, where: str) -> None:
    """A UserError when the set's records cannot give ``metric`` (before any training starts)."""
    if metric in ("multiple_choice", "multiple_choice_norm") and not any(e.choices is not None for e in examples):
        raise UserError(
            f"{where}: metric {metric} needs multiple-choice records ({{'question', 'choices', 'answer'}}); "
            f"choose another metric or give multiple-choice data"
        )
    if (metric in GENERATED or is_scoring_function(metric)) and not any(e.prompt_ids and e.reference is not None for e in examples):
        raise UserError(
            f"{where}: metric {metric} compares generations with references, but the records have no prompt to "
            f"generate from (text records, or prompts cut by data.max_length); use token_accuracy, loss or "
            f"perplexity, or prompt/completion, chat or multiple-choice records"
        )


def headline_value(result: dict, metric: str) -> Optional[float]:
    """The value of a built-in ``metric`` in a result dict (None when the set has no such score)."""
    value = result.get(RESULT_KEYS[metric])
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

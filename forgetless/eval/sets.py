"""Evaluation sets of a run and their scoring: every data.eval / data.keep set and harness task.

An :class:`EvalSet` is a named list of examples with a role ("new": the task being learned,
"keep": what must not be forgotten) and its headline metric, resolved when the data is prepared
(so a metric that does not fit the data, or a scoring function that cannot be imported, fails
before training). lm-evaluation-harness tasks are sets too (``harness/<task>``, role "keep"),
scored through lm-eval instead of from examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from forgetless.data.formats import EncodeStats, Example
from forgetless.errors import UserError
from forgetless.eval.custom import load_scoring_function
from forgetless.eval.headline import check_metric_fits, default_metric, higher_is_better, is_scoring_function
from forgetless.eval.scoring import score_examples
from forgetless.progress import eval_progress
from forgetless import zero
from forgetless.sharding import reshard


@dataclass
class EvalSet:
    name: str
    role: str  # "new" (the task being learned) or "keep" (what must not be forgotten)
    examples: list[Example]
    stats: EncodeStats
    metric: str = "token_accuracy"  # what the set's "score" is (see forgetless.eval.headline)
    harness: Optional[object] = field(default=None, repr=False)  # HarnessTasks for harness/<task> sets

    @property
    def higher_is_better(self) -> bool:
        if self.harness is not None:
            return self.harness.higher_is_better[self.name.split("/", 1)[1]]
        return higher_is_better(self.metric)


def make_eval_set(name: str, role: str, examples: list[Example], stats: EncodeStats, metric: Optional[str],
                  generation: bool, where: str) -> EvalSet:
    """An EvalSet with its metric resolved (``metric`` or the data's natural one) and checked against the data."""
    metric = metric or default_metric(examples, generation)
    check_metric_fits(metric, examples, where)
    if is_scoring_function(metric):
        load_scoring_function(metric, name)  # import errors surface now, not after training
    return EvalSet(name, role, examples, stats, metric)


def harness_sets(cfg, taken: set[str]) -> list[EvalSet]:
    """One "keep" set per ``eval.harness.tasks`` entry (looked up now, scored by lm-eval)."""
    h = cfg.eval.harness
    if not h.tasks:
        return []
    from forgetless.eval.harness import PREFIX, HarnessTasks

    clash = [PREFIX + t for t in h.tasks if PREFIX + t in taken]
    if clash:
        raise UserError(f"eval.harness.tasks: the set name {clash[0]!r} is also a data.eval/data.keep name; rename that set")
    tasks = HarnessTasks(
        h.tasks, include_path=h.include_path, limit=h.limit or cfg.eval.max_examples, num_fewshot=h.num_fewshot,
        batch_size=h.batch_size or cfg.eval.batch_size, metric=h.metric,
    )
    return [EvalSet(PREFIX + t, "keep", [], EncodeStats(), tasks.metrics[t], tasks) for t in h.tasks]


def evaluate_sets(model, tokenizer, eval_sets: list[EvalSet], cfg, accelerator, label: str,
                  verdicts: Optional[dict[str, list]] = None) -> dict[str, dict[str, float]]:
    """Score every set; identical numbers on every process. ``verdicts``: filled with each set's
    per-example verdicts (``score_examples``'s; sets that judge no single example give none)."""
    results = {}
    show = cfg.output.progress and accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(model)
    # FSDP2 and ZeRO-3: every process scores every set whole (their forward passes gather the
    # parameters, so they must run the same ones) and decodes in step with the others
    sharded = (getattr(accelerator, "is_fsdp2", False) or zero.stage(accelerator) == 3) and accelerator.num_processes > 1
    multi = accelerator.num_processes > 1 and not sharded
    rank, world = (accelerator.process_index, accelerator.num_processes) if multi else (0, 1)
    gather = None
    if multi:
        from accelerate.utils import gather_object as gather
    for s in eval_sets:
        if s.harness is not None:
            continue
        judged = [] if verdicts is not None else None
        with eval_progress(math.ceil(len(s.examples) / world), f"eval {label}: {s.name}", show) as advance:
            results[s.name] = score_examples(
                unwrapped,
                s.examples,
                tokenizer,
                batch_size=cfg.eval.batch_size,
                generation=cfg.eval.generation,
                max_new_tokens=cfg.eval.max_new_tokens,
                score_eos=cfg.eval.score_eos,
                rank=rank,
                world_size=world,
                reduce=(lambda t: accelerator.reduce(t, "sum")) if multi else None,
                gather=gather,
                device=accelerator.device,
                on_batch=advance,
                metric=s.metric,
                name=s.name,
                verdicts=judged,
                synced=sharded,
            )
        if judged:
            verdicts[s.name] = judged
    suites = {id(s.harness): s.harness for s in eval_sets if s.harness is not None}
    for suite in suites.values():
        results.update(_harness_on_main(suite, unwrapped, tokenizer, accelerator, show))
    if sharded:
        reshard(unwrapped)  # the no-grad passes left the root unit gathered
    return {s.name: results[s.name] for s in eval_sets}


def _harness_on_main(suite, model, tokenizer, accelerator, show: bool) -> dict:
    """lm-eval scores on the main process (it takes the model as one process), shared with the others."""
    if accelerator.num_processes == 1:
        return suite.evaluate(model, tokenizer, progress=show)
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if accelerator.is_main_process:
        try:
            box = [("ok", suite.evaluate(model, tokenizer, progress=show))]
        except UserError as e:
            box = [("error", str(e))]
    broadcast_object_list(box)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value

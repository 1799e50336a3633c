"""A forgetting budget: an online signal of forgetting, and a controller that keeps the run inside it.

The user states what must be kept: ``data.keep.NAME.max_drop`` (the most a keep set's score may
fall) and/or ``budget.kl_max`` (the most the model may move, as KL, from where it started on the
task's own inputs). Every ``budget.every_steps`` optimiser steps the run measures

- **the online KL**: ``KL(start || model)`` per target token on a fixed, seeded sample of the
  training data, against the starting model's next-token distributions, which are computed once
  at the start and kept as their top-k tokens plus one bucket for the rest. The KL of the pooled
  distributions is a lower bound of the full KL (pooling never raises a KL) and equals it when the
  rest holds no mass; no second model is kept. Forgetting tracks this KL on the new task's data
  (Shenfeld et al. 2025, "RL's Razor", arXiv 2509.04259);
- **the keep samples**: a fixed, seeded sample of every keep set, scored by its headline metric,
  against the same sample scored at the start.

Both go to ``metrics.jsonl`` as ``{"step": N, "budget": {...}}`` records and into the report.

The controller (``budget.control``). Each protective method that declares the STRENGTH capability
has its strength multiplied by one factor ``s``: the loss terms of kl, l2sp and ewc
(forgetless/recipes/finetune.py applies it), the batch share of mix's, replay's and
synthetic_replay's streams (their starting shares times ``s``, all mixed-in streams together at
most MAX_MIXED of a batch; from the next step on, the earlier batches unchanged).
At every check, with ``v`` the worst relative violation over the limits, ``(drop - aim * max) /
(aim * max)`` (``budget.aim``, default 1; below 1 the controller steers inside each limit, a margin
for the noise of a small keep sample; inside or over is still judged against ``max``), ``log s``
moves by ``step_size * min(v, 2)`` over budget and by ``relax * step_size * max(v, -1)``
inside it, within [min_scale, max_scale]: dual ascent on the budget constraint, in log space, so
``s`` grows while the run is over budget and shrinks (the model may learn more) while it is
inside. The weights of the last check inside the budget are kept (trainable parameters, on the
main process's CPU; a restore sends them to the others). The run stops early after ``patience`` checks in a row
over budget with the strength at ``max_scale`` (or with nothing to control). At the end, the
keep sets that have a ``max_drop`` are scored on their whole sets; if one exceeds it and
``budget.restore`` is on, the kept weights come back before the final evaluation. Everything the
controller holds (strength, kept weights, counters) is in the checkpoints, so a resumed run takes
the same decisions; the starting distributions and sample scores are recomputed at the start of
the resumed process, from the same starting model, before its weights are restored.

Written by hand: no training library has a forgetting budget or this controller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from forgetless.data.batching import micro_batches
from forgetless.eval.sets import EvalSet, evaluate_sets
from forgetless.loss import forward as lm_forward, target_positions
from forgetless.registry import REGISTRY, STRENGTH

KL = "online_kl"  # the name of the KL limit among the keep sets' (a keep set may not take it)
FLOOR = 0.01  # a max_drop of 0 is judged against this, so that the violation stays finite
UP_CLIP = 2.0  # over budget, a step raises log s by at most 2 x step_size (about x4 per check at the default)


# ------------------------------------------------------------------------------------------------
# pure functions: the pooled KL, a score's drop, the worst violation, the controller's step
# ------------------------------------------------------------------------------------------------


def top_k_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k token ids and their log-probabilities of every row of ``logits`` (rows, vocab)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top.indices, top.values


def pooled_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p || q) between the reference p, kept as its top-k (ids, log-probs) plus
    one bucket for the rest of its mass, and q = softmax(``logits``) pooled the same way.

    ``sum_j p_j (log p_j - log q_j) + r_p (log r_p - log r_q)`` over the kept tokens j, with r the
    pooled rest. A lower bound of the full KL (log-sum inequality), equal to it when r_p = 0.
    """
    logq = F.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, top_ids)
    p = top_logp.exp()
    kept = (p * (top_logp - q_top)).sum(-1)
    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)
    rest_q = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-30).log() - rest_q.log()), torch.zeros_like(rest_p))
    return (kept + tail).sum()


def score_drop(before: float, now: float, higher_is_better: bool) -> float:
    """How far a score fell: ``before - now`` for higher-is-better scores, the relative rise
    ``(now - before) / |before|`` for loss and perplexity."""
    if higher_is_better:
        return before - now
    return (now - before) / max(abs(before), 1e-12)


def worst_violation(drops: dict[str, float], limits: dict[str, float]) -> Optional[float]:
    """``max over limits of (drop - max) / max(max, FLOOR)``: above 0 is over budget. None without limits."""
    values = [(drops[n] - m) / max(m, FLOOR) for n, m in limits.items() if n in drops and drops[n] is not None]
    return max(values) if values else None


def aimed(limits: dict[str, float], aim: float) -> dict[str, float]:
    """The limits the controller steers to: ``aim`` x each (``budget.aim``)."""
    return {n: m * aim for n, m in limits.items()}


def next_log_scale(log_scale: float, violation: float, step_size: float, lo: float, hi: float, relax: float = 1.0,
                   up_clip: float = 1.0) -> float:
    """One controller step, within [log lo, log hi]: ``log s + step_size * min(v, up_clip)`` over
    budget, ``log s + relax * step_size * max(v, -1)`` inside it."""
    v = min(up_clip, violation) if violation > 0 else relax * max(-1.0, violation)
    return max(math.log(lo), min(math.log(hi), log_scale + step_size * v))


MAX_MIXED = 0.9  # the controller never lets mixed-in streams take more of a batch than this


def stream_shares(start: list[float], controlled: dict[int, float], scale: float) -> list[float]:
    """Every source's share when the controlled streams' starting shares are scaled by ``scale``:
    the other mixed-in streams keep theirs, all mixed-in streams together at most MAX_MIXED (the
    controlled ones scaled down to fit), and the task takes the rest."""
    shares = list(start)
    fixed = sum(w for j, w in enumerate(start) if j and j not in controlled)
    wanted = {j: w * scale for j, w in controlled.items()}
    room = max(0.0, MAX_MIXED - fixed)
    total = sum(wanted.values())
    fit = min(1.0, room / total) if total > 0 else 1.0
    for j, w in wanted.items():
        shares[j] = w * fit
    shares[0] = 1.0 - sum(shares[1:])
    return shares


def sample_indices(n: int, size: Optional[int], seed: int) -> list[int]:
    """A fixed, seeded sample of ``size`` of ``n`` positions (all when size is None or >= n), in order."""
    if size is None or size >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


def budget_limits(cfg) -> dict[str, float]:
    """The run's limits: each keep set's max_drop, and ``kl`` for budget.kl_max."""
    limits = {name: spec.max_drop for name, spec in cfg.data.keep.items() if spec.max_drop is not None}
    if cfg.budget.kl_max is not None:
        limits[KL] = cfg.budget.kl_max
    return limits


# ------------------------------------------------------------------------------------------------
# the run's budget: measured every N steps, controlling the methods' strength
# ------------------------------------------------------------------------------------------------


class Budget:
    """The signal and the controller of one run. Its state joins the checkpoints as ``budget``."""

    name = "budget"

    def __init__(self, cfg, methods: list, eval_sets: list[EvalSet], train_examples, total_steps: int, batches=None,
                 stream_owners: Optional[list[Optional[str]]] = None):
        b = cfg.budget
        self.cfg, self.b = cfg, b
        self.limits = budget_limits(cfg)
        if b.every_steps is None:
            self.every = max(1, total_steps // 10) if self.limits else 0
        else:
            self.every = b.every_steps
        self.total_steps = total_steps
        controls = b.control and bool(self.limits)
        self.controlled = [m for m in methods if REGISTRY[m.name].has(STRENGTH)] if controls else []
        # streams of the batch whose share is a method's strength (mix, replay): source index -> its starting share
        self.batches = batches
        owners = stream_owners or []
        self.streams = {j: batches.shares[j] for j, owner in enumerate(owners)
                        if controls and owner is not None and REGISTRY[owner].has(STRENGTH)} if batches is not None else {}
        self.keep_sets = [s for s in eval_sets if s.role == "keep" and s.harness is None]
        self.higher = {s.name: s.higher_is_better for s in self.keep_sets}
        seed = cfg.train.seed
        self.samples = [dataclasses.replace(s, examples=[s.examples[i] for i in sample_indices(len(s.examples), b.keep_sample, seed + k)])
                        for k, s in enumerate(self.keep_sets)]
        self.train_examples = train_examples
        # the controller's state (checkpointed)
        self.log_scale = 0.0
        self.checks = 0
        self.changes = 0
        self.over_at_max = 0
        self.stopped_at: Optional[int] = None
        self.kept_step: Optional[int] = None
        self.kept: list[torch.Tensor] = []
        self.restored_step: Optional[int] = None
        self.final: dict = {}
        # measured at the start (recomputed by a resumed process from the same starting model)
        self.reference: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
        self.start_scores: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.every > 0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0 and step < self.total_steps

    # -- the start ---------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, model, tokenizer, accelerator) -> None:
        """The starting model's distributions on the task sample and its keep-sample scores."""
        self.main = accelerator.is_main_process
        if not self.active and KL not in self.limits:  # (a KL budget is checked at the end even without checks)
            return
        rank, world = accelerator.process_index, accelerator.num_processes
        examples = self.train_examples
        if hasattr(examples, "take"):  # a stream: its first records
            sample = list(examples.head(self.b.kl_sample))
        else:
            sample = [examples[i] for i in sample_indices(len(examples), self.b.kl_sample, self.cfg.train.seed + 104729)]
        mine = sample[rank::world]
        plain = accelerator.unwrap_model(model)
        was_training = plain.training
        plain.eval()
        self.reference = []
        for batch in micro_batches(mine, self.cfg.eval.batch_size, tokenizer.pad_token_id):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            ids, logp = [], []
            for logits in _target_logits(plain, batch, accelerator):
                i, lp = top_k_reference(logits, self.b.kl_top_k)
                ids.append(i)
                logp.append(lp)
            self.reference.append(({k: v.cpu() for k, v in batch.items()}, torch.cat(ids).cpu(), torch.cat(logp).cpu()))
        plain.train(was_training)
        scores = evaluate_sets(model, tokenizer, self.samples, self.cfg, accelerator, "budget: start") if self.samples and self.active else {}
        self.start_scores = {n: r.get("score") for n, r in scores.items()}
        self._apply()

    # -- every N steps -----------------------------------------------------------------------

    @torch.no_grad()
    def online_kl(self, model, accelerator) -> float:
        """KL(start || model) per target token on the task sample (pooled top-k; all processes agree)."""
        plain = accelerator.unwrap_model(model)
        was_training = plain.training
        plain.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch, ids, logp in self.reference:
            b = {k: v.to(accelerator.device) for k, v in batch.items()}
            start = 0
            for logits in _target_logits(plain, b, accelerator):
                rows = logits.shape[0]
                total[0] += float(pooled_kl(logits, ids[start:start + rows].to(logits.device), logp[start:start + rows].to(logits.device)))
                total[1] += rows
                start += rows
        plain.train(was_training)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
        return float(total[0] / max(total[1], 1))

    def check(self, model, tokenizer, accelerator, step: int, params: list) -> dict:
        """Measure, take the controller's step, keep the weights if inside; the metrics record."""
        self.checks += 1
        kl = self.online_kl(model, accelerator)
        scores = evaluate_sets(model, tokenizer, self.samples, self.cfg, accelerator, f"budget step {step}") if self.samples else {}
        keep = {n: r.get("score") for n, r in scores.items()}
        drops = {n: score_drop(self.start_scores[n], v, self.higher[n]) for n, v in keep.items()
                 if v is not None and self.start_scores.get(n) is not None}
        drops[KL] = kl
        violation = worst_violation(drops, self.limits)
        record = {"kl": kl, "keep": keep, "drop": {n: d for n, d in drops.items() if n != KL}}
        if violation is None:  # only the signal: nothing to keep inside
            return record
        inside = violation <= 0
        action = "held"
        if self.controlled:
            before = self.log_scale
            steer = worst_violation(drops, aimed(self.limits, self.b.aim))  # to aim x the limits: a margin for noise
            self.log_scale = next_log_scale(self.log_scale, steer, self.b.step_size, self.b.min_scale, self.b.max_scale,
                                            self.b.relax, UP_CLIP)
            if self.log_scale != before:
                self.changes += 1
                action = "raised" if self.log_scale > before else "lowered"
                self._apply(step)
        if inside:  # the weights are the same on every process: the main one keeps them, and sends them back at a restore
            self.kept_step = step
            self.kept = [p.detach().to("cpu", copy=True) for p in params] if self.main else []
            self.over_at_max = 0
        elif not self.controlled or self.log_scale >= math.log(self.b.max_scale) - 1e-9:
            self.over_at_max += 1
            if self.b.patience and self.over_at_max >= self.b.patience:
                self.stopped_at = step
                action = "stopped"
        else:
            self.over_at_max = 0
        record.update({"violation": violation, "inside": inside, "strength": self.scale, "action": action})
        return record

    def _apply(self, step: Optional[int] = None) -> None:
        """The strength on every controlled method; from ``step`` on, the controlled streams' shares too."""
        for m in self.controlled:
            m.strength = self.scale
        if self.streams and step is not None:
            self.batches.set_shares(step, stream_shares(self.batches.segments[0][1], self.streams, self.scale))

    # -- the end -----------------------------------------------------------------------------

    def final_check(self, model, tokenizer, accelerator, eval_sets: list[EvalSet], before: dict, step: int,
                    params: list) -> Optional[dict]:
        """The keep sets with a max_drop scored whole (and the KL); the kept weights back when over
        budget and ``budget.restore``. Returns the metrics record, or None without limits."""
        if not self.limits:
            return None
        limited = [s for s in eval_sets if s.name in self.limits]
        scores = evaluate_sets(model, tokenizer, limited, self.cfg, accelerator, "budget: end") if limited else {}
        drops = {n: score_drop(before[n]["score"], r["score"], self.higher[n]) for n, r in scores.items()
                 if r.get("score") is not None and before.get(n, {}).get("score") is not None}
        if KL in self.limits:
            drops[KL] = self.online_kl(model, accelerator)
        violation = worst_violation(drops, self.limits)
        inside = violation is None or violation <= 0
        record = {"drop": drops, "violation": violation, "inside": inside, "strength": self.scale, "action": "end"}
        if not inside and self.b.restore and self.kept_step is not None and self.kept_step < step:
            with torch.no_grad():
                for i, p in enumerate(params):
                    if self.main:
                        p.copy_(self.kept[i].to(p.device))
                    if accelerator.num_processes > 1:
                        torch.distributed.broadcast(p.data, src=0)
            self.restored_step = self.kept_step
            record["action"] = f"restored step {self.kept_step}"
        self.final = {"drop": drops, "inside": inside, **({"restored_step": self.restored_step} if self.restored_step is not None else {})}
        return record

    def describe(self) -> dict:
        out = {"every_steps": self.every, "checks": self.checks, "limits": self.limits}
        if self.limits:
            controlled = [m.name for m in self.controlled]
            if self.streams:
                out["shares"] = {self.batches.sources[j].name: round(self.batches.shares[j], 4) for j in self.streams}
            out.update({"controlled": controlled, "strength": round(self.scale, 6),
                        "changes": self.changes, "stopped_at": self.stopped_at, "kept_step": self.kept_step,
                        "restored_step": self.restored_step, **({"end": self.final} if self.final else {})})
        return out

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"log_scale": self.log_scale, "checks": self.checks, "changes": self.changes, "over_at_max": self.over_at_max,
                 "stopped_at": self.stopped_at, "kept_step": self.kept_step, "kept_count": len(self.kept)}
        if self.streams:
            state["segments"] = [[start, shares] for start, shares in self.batches.segments]
        state.update({f"kept.{i}": t for i, t in enumerate(self.kept)})
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for key in ("log_scale", "checks", "changes", "over_at_max", "stopped_at", "kept_step"):
            setattr(self, key, state[key])
        self.kept = [state[f"kept.{i}"] for i in range(state["kept_count"])] if getattr(self, "main", True) else []
        self._apply()
        if state.get("segments"):  # the shares as they were drawn, exactly (not normalised again)
            self.batches.restore_segments([(int(start), [float(w) for w in shares]) for start, shares in state["segments"]])


def _target_logits(plain, batch: dict, accelerator):
    """The model's logits at the batch's target positions, in chunks of rows (never the whole batch's)."""
    out = lm_forward(plain, batch["input_ids"], batch["attention_mask"], autocast=accelerator.autocast)
    select = target_positions(batch["labels"])
    if out.logits is not None:
        yield out.logits[:, :-1][select].float()
        return
    rows = out.rows(select)
    step = out.chunk_rows()
    with out.autocast():
        for start in range(0, rows.shape[0], step):
            yield out.head(rows[start:start + step]).float()

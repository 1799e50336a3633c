"""Weight interpolation after training (WiSE-FT, Wortsman et al. 2022).

``theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned``: alpha 0 is the base model,
alpha 1 the fine-tuned one. Sweeping alpha and scoring the new task and the keep sets at each
value shows the trade-off between what was learned and what was kept; the chosen model is
written out as a standalone model directory.

A LoRA run is merged into its base first (PEFT's ``merge_and_unload``), so interpolation then
scales the low-rank update. Adapters that are not linear in the weights (bottleneck, mixture of
experts) have no weight-space interpolation with the base; they are refused with a clear error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, INTERPOLATED_DIR, INTERPOLATION_CSV, INTERPOLATION_FILE, MODEL_DIR


@dataclass
class SweepPoint:
    alpha: float
    scores: dict[str, dict[str, float]]


def primary_score(metrics: dict[str, float]) -> float:
    """The score a set is judged by: its headline ``score`` (the metric of its DatasetSpec, or the
    data's natural one); without one, exact match when generated, else token accuracy."""
    if metrics.get("score") is not None:
        return metrics["score"]
    return metrics["exact_match"] if "exact_match" in metrics else metrics.get("token_accuracy", 0.0)


def interpolate_state(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * base + alpha * finetuned`` for every tensor (floating point ones; others from finetuned)."""
    _check_same_shapes(base, finetuned)
    return {k: torch.lerp(b.float(), finetuned[k].float(), alpha).to(finetuned[k].dtype) if finetuned[k].is_floating_point() else finetuned[k]
            for k, b in base.items()}


def plain_weights(model) -> torch.nn.Module:
    """A model with plain weights: LoRA merged in; other adapters refused."""
    from forgetless.models.adapters import ADAPTER_KINDS, is_peft_model

    if is_peft_model(model):
        return model.merge_and_unload()
    for kind in ADAPTER_KINDS.values():
        if kind.detect(model):
            raise UserError(f"cannot interpolate a model with {kind.name} adapters: they are not linear in the weights; interpolate full or LoRA fine-tunes")
    return model


def select_alpha(points: list[SweepPoint], roles: dict[str, str], min_keep: Optional[float] = None,
                 lower_is_better: frozenset = frozenset()) -> SweepPoint:
    """The chosen point.

    Default ("balanced"): the highest mean primary score over all sets. With ``min_keep``: the
    best mean new-task score among the points whose every keep set retains at least ``min_keep``
    of its score at the smallest alpha (the base model); the smallest alpha wins ties. A set whose
    score is lower-is-better (loss, perplexity: ``lower_is_better``) counts as the share of the
    base's value it keeps, ``base / score`` (1 at the base), in the mean and the rule alike.
    """
    new = [n for n, r in roles.items() if r == "new"] or list(roles)
    keep = [n for n, r in roles.items() if r == "keep"]
    base = min(points, key=lambda p: p.alpha)

    def value(p: SweepPoint, n: str) -> float:
        s = primary_score(p.scores[n])
        return primary_score(base.scores[n]) / max(s, 1e-12) if n in lower_is_better else s

    def mean(p: SweepPoint, names: list[str]) -> float:
        return sum(value(p, n) for n in names) / max(len(names), 1)

    candidates = points
    if min_keep is not None:
        candidates = [p for p in points if all(value(p, n) >= min_keep * value(base, n) for n in keep)]
        if not candidates:
            candidates = [base]
        return max(candidates, key=lambda p: (mean(p, new), -p.alpha))
    return max(candidates, key=lambda p: (mean(p, list(roles)), -p.alpha))


class Interpolator:
    """Holds the base and fine-tuned weights and sets a working model to any alpha.

    Memory: three copies of the weights in the models' dtype, on the models' device (the
    accelerator when there is one): the base's and the fine-tuned model's tensors, and the working
    model (the fine-tuned model itself). ``at`` writes each tensor in place, interpolated in float32
    one tensor at a time, so no fourth copy is ever built. The base model passed in may be freed.
    """

    def __init__(self, base_model, finetuned_model):
        self.model = plain_weights(finetuned_model)
        device = next(self.model.parameters()).device
        self.base_state = {k: v.detach().to(device, copy=True) for k, v in plain_weights(base_model).state_dict().items()}
        self.ft_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        _check_same_shapes(self.base_state, self.ft_state)

    @torch.no_grad()
    def at(self, alpha: float) -> torch.nn.Module:
        live = self.model.state_dict()  # the model's own tensors: writing them sets the model
        for k, target in live.items():
            b, f = self.base_state[k], self.ft_state[k]
            target.copy_(torch.lerp(b.float(), f.float(), alpha) if f.is_floating_point() else f)
        return self.model


def _check_same_shapes(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    if base.keys() != finetuned.keys():
        missing = sorted(set(base) ^ set(finetuned))[:3]
        raise UserError(f"cannot interpolate: the models have different parameters (e.g. {', '.join(missing)}); both must share one architecture")
    for k, b in base.items():
        if b.shape != finetuned[k].shape:
            raise UserError(f"cannot interpolate: parameter {k} has shape {tuple(b.shape)} in the base and {tuple(finetuned[k].shape)} in the fine-tuned model")


def sweep(interp: Interpolator, tokenizer, sets: dict, alphas: list[float], *, batch_size: int = 16,
          generation: bool = True, max_new_tokens: Optional[int] = None, progress: bool = False,
          metrics: Optional[dict[str, str]] = None) -> list[SweepPoint]:
    """Score the interpolated model on every set at each alpha (``metrics``: each set's headline metric)."""
    from forgetless.eval.run import score_sets

    return [
        SweepPoint(alpha, score_sets(interp.at(alpha), tokenizer, sets, batch_size=batch_size, generation=generation,
                                     max_new_tokens=max_new_tokens, progress=progress, label=f"alpha {alpha:g}", metrics=metrics))
        for alpha in alphas
    ]


def run_interpolation(
    run_or_model: str,
    *,
    base: Optional[str] = None,
    new: Optional[dict[str, str]] = None,
    keep: Optional[dict[str, str]] = None,
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    min_keep: Optional[float] = None,
    output: Optional[str] = None,
    max_examples: Optional[int] = 256,
    batch_size: int = 16,
    generation: bool = True,
    max_new_tokens: Optional[int] = None,
    progress: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
) -> dict:
    """Sweep alpha between a base and a fine-tuned model, write the chosen model and the table.

    ``run_or_model`` is a forgetless run directory (its base model and eval / keep sets are
    taken from its config.yaml unless given) or a fine-tuned model directory (then ``base`` and
    the sets must be given). Both models are loaded in ``dtype`` (as ``model.dtype``) on the
    accelerator when there is one.
    """
    import dataclasses

    from forgetless.config import ModelConfig, load_config
    from forgetless.eval.run import load_eval_sets
    from forgetless.models import load_model, load_tokenizer
    from forgetless.models.loading import resolve_model_dir

    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise UserError(f"--alphas {list(alphas)}: give values between 0 and 1, e.g. 0,0.25,0.5,0.75,1")
    run_dir = Path(run_or_model)
    is_run = (run_dir / CONFIG_FILE).is_file() and (run_dir / MODEL_DIR).is_dir()
    ft_dir = resolve_model_dir(run_or_model)
    if not Path(ft_dir).is_dir():
        raise UserError(f"{run_or_model}: not a run or model directory; give a run directory or a fine-tuned model folder")
    out = Path(output) if output else (run_dir / INTERPOLATED_DIR if is_run else Path(ft_dir).parent / INTERPOLATED_DIR)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or choose --output")
    run_cfg = load_config(run_dir / CONFIG_FILE) if is_run else None
    if base is not None:
        base_cfg, base_seed = ModelConfig(name_or_path=base, dtype=dtype), 0
    elif run_cfg is not None:
        # 'tiny' rebuilds the same random init from the seed
        base_cfg, base_seed = dataclasses.replace(run_cfg.model, dtype=dtype, device_map=None), run_cfg.train.seed
    else:
        raise UserError(f"{run_or_model}: not a run directory, so give the base model with --base")
    new, keep = dict(new or {}), dict(keep or {})
    if run_cfg is not None and not new and not keep:
        new = {name: spec for name, spec in run_cfg.data.eval.items()} or {"task": run_cfg.data.train[0]}
        keep = dict(run_cfg.data.keep)
    if not new and not keep:
        raise UserError("no data to score: give --new NAME=PATH and/or --keep NAME=PATH")
    overlap = set(new) & set(keep)
    if overlap:
        raise UserError(f"the name {sorted(overlap)[0]!r} is given both as --new and --keep; use distinct names")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=ft_dir))
    max_length = run_cfg.data.max_length if run_cfg is not None else 1024
    sets = load_eval_sets(tokenizer, {**new, **keep}, max_examples=max_examples, max_length=max_length)
    roles = {**{n: "new" for n in new}, **{n: "keep" for n in keep}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ft_model = load_model(ModelConfig(name_or_path=ft_dir, dtype=dtype), tokenizer).to(device)
    interp = Interpolator(load_model(base_cfg, load_tokenizer(base_cfg), seed=base_seed), ft_model)  # the base model is freed
    # each set's headline metric, as the run scored it (its DatasetSpec's metric, or the data's natural one)
    from forgetless.config import DatasetSpec
    from forgetless.eval.headline import higher_is_better
    from forgetless.eval.sets import make_eval_set
    from forgetless.data.formats import EncodeStats

    given = {**new, **keep}
    metrics = {name: make_eval_set(name, roles[name], examples, EncodeStats(),
                                   given[name].metric if isinstance(given[name], DatasetSpec) else None, generation, f"set {name}").metric
               for name, examples in sets.items()}
    points = sweep(interp, tokenizer, sets, sorted(set(alphas)), batch_size=batch_size, generation=generation,
                   max_new_tokens=max_new_tokens, progress=progress, metrics=metrics)
    chosen = select_alpha(points, roles, min_keep, frozenset(n for n, m in metrics.items() if not higher_is_better(m)))
    model = interp.at(chosen.alpha)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    result = {
        "base": base_cfg.name_or_path,
        "finetuned": ft_dir,
        "roles": roles,
        "metrics": metrics,
        "selection": {"rule": "min_keep" if min_keep is not None else "balanced", "min_keep": min_keep, "alpha": chosen.alpha},
        "points": [{"alpha": p.alpha, "scores": p.scores} for p in points],
        "output": str(out),
    }
    (out / INTERPOLATION_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    with open(out / INTERPOLATION_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["alpha", "set", "role", "metric", "score", "loss", "token_accuracy", "exact_match"])
        for p in points:
            for name, m in p.scores.items():
                w.writerow([p.alpha, name, roles[name], metrics[name], m.get("score"), m.get("loss"), m.get("token_accuracy"), m.get("exact_match", "")])
    return result

"""Weight interpolation after training (WiSE-FT, Wortsman et al. 2022).

``theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned``: alpha 0 is the base model,
alpha 1 the fine-tuned one. Sweeping alpha and scoring the new task and the keep sets at each
value shows the trade-off between what was learned and what was kept; the chosen model is
written out as a standalone model directory.

A LoRA run is merged into its base first (PEFT's ``merge_and_unload``), so interpolation then
scales the low-rank update. Adapters that are not linear in the weights (bottleneck, mixture of
experts) have no weight-space interpolation with the base; they are refused with a clear error.

Task-vector merging (forgetless.merging). Given ``merge`` (ties, dare_ties, dare_linear,
task_arithmetic, magnitude), the runs' task vectors ``tau_t = theta_t - theta_base`` (one run or
several over one base) are merged into one, and the sweep scales it:
``theta(lambda) = theta_base + lambda * merge(tau_1, ..., tau_T)``; with one run this trims (TIES,
magnitude) or drops and rescales (DARE) that run's own update. Alpha and lambda are one number:
``(1 - alpha) * base + alpha * finetuned = base + alpha * tau``.

Per-layer weights (``per_layer=G``): the blocks are split into G groups of consecutive blocks, the
embeddings, final norm and head form one more group, and each group gets its own alpha:
``theta = theta_base + alpha_g * tau``. They are chosen by a coordinate search that starts from the
best global alpha: group by group (first block to last, then the outer group), every other value
of the alpha grid is scored with the other groups fixed, and the group keeps the value the global
rule (:func:`select_alpha`, the same ``min_keep``, judged against the base model's scores) prefers.
One pass costs ``(G + 1) * (len(alphas) - 1)`` evaluations of every set, on top of the global sweep.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, INTERPOLATED_DIR, INTERPOLATION_CSV, INTERPOLATION_FILE, MERGE_FILE, MODEL_DIR
from forgetless.merging import (
    DEFAULT_DENSITY,
    MERGE_METHODS,
    RANDOM_METHODS,
    SPARSE_METHODS,
    group_order,
    layer_groups,
    merge_task_vectors,
    task_vector,
)

MAX_MERGED_SCALE = 2.0  # lambda above 1 extrapolates the merged vector; beyond 2 it is rarely a model


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


def _rule(roles: dict[str, str], min_keep: Optional[float], lower_is_better: frozenset, reference: SweepPoint):
    """(feasible(p), rank(p)) of the selection rule (see :func:`select_alpha`), judged against ``reference``."""
    new = [n for n, r in roles.items() if r == "new"] or list(roles)
    keep = [n for n, r in roles.items() if r == "keep"]

    def value(p: SweepPoint, n: str) -> float:
        s = primary_score(p.scores[n])
        return primary_score(reference.scores[n]) / max(s, 1e-12) if n in lower_is_better else s

    def mean(p: SweepPoint, names: list[str]) -> float:
        return sum(value(p, n) for n in names) / max(len(names), 1)

    if min_keep is None:
        return (lambda p: True), (lambda p: (mean(p, list(roles)), -p.alpha))
    return (lambda p: all(value(p, n) >= min_keep * value(reference, n) for n in keep)), (lambda p: (mean(p, new), -p.alpha))


def select_alpha(points: list[SweepPoint], roles: dict[str, str], min_keep: Optional[float] = None,
                 lower_is_better: frozenset = frozenset(), reference: Optional[SweepPoint] = None) -> SweepPoint:
    """The chosen point.

    Default ("balanced"): the highest mean primary score over all sets. With ``min_keep``: the
    best mean new-task score among the points whose every keep set retains at least ``min_keep``
    of its score at the smallest alpha (the base model; or at ``reference``); the smallest alpha
    wins ties, and with no such point the smallest alpha is chosen. A set whose score is
    lower-is-better (loss, perplexity: ``lower_is_better``) counts as the share of the base's value
    it keeps, ``base / score`` (1 at the base), in the mean and the rule alike.
    """
    base = min(points, key=lambda p: p.alpha)
    feasible, rank = _rule(roles, min_keep, lower_is_better, reference or base)
    return max([p for p in points if feasible(p)] or [base], key=rank)


def search_per_layer(score: Callable[[dict[str, float]], dict], groups: list[str], start: SweepPoint, alphas: Sequence[float],
                     roles: dict[str, str], min_keep: Optional[float], lower_is_better: frozenset,
                     reference: SweepPoint) -> tuple[dict[str, float], list[dict]]:
    """Per-group alphas by one pass of coordinate search from the global choice ``start``.

    For each group in turn, ``score(alphas_by_group)`` is called for every other alpha of the grid
    (the other groups at their current values); the group takes the value :func:`select_alpha`'s
    rule prefers among those and its current one (unchanged when none passes ``min_keep``).
    Returns the alphas and every trial (``len(groups) * (len(alphas) - 1)`` of them).
    """
    current = {g: start.alpha for g in groups}
    at = start
    feasible, rank = _rule(roles, min_keep, lower_is_better, reference)
    trials = []
    for g in groups:
        candidates = [SweepPoint(current[g], at.scores)]
        for a in alphas:
            if a == current[g]:
                continue
            trial = {**current, g: a}
            point = SweepPoint(a, score(trial))
            trials.append({"group": g, "alphas": trial, "scores": point.scores})
            candidates.append(point)
        passing = [p for p in candidates if feasible(p)]
        if passing:
            at = max(passing, key=rank)
            current[g] = at.alpha
    return current, trials


class Interpolator:
    """Holds the base and fine-tuned weights and sets a working model to any alpha.

    Memory: three copies of the weights in the models' dtype, on the models' device (the
    accelerator when there is one): the base's and the fine-tuned model's tensors, and the working
    model (the fine-tuned model itself). ``at`` writes each tensor in place, interpolated in float32
    one tensor at a time, so no fourth copy is ever built. The base model passed in may be freed.

    With ``merge`` (a merge method of forgetless.merging) the "fine-tuned" tensors are
    ``base + merge(tau)`` over the task vectors of ``finetuned_model`` and of ``others`` (models
    over the same base, taken one at a time and freed; with none, the one run's own vector is
    trimmed or dropped). The vectors are built and merged in float32 on the CPU (DARE's seeded drop
    is then the same on every device): one float32 copy of the changed weights per run, in RAM.
    ``merge_options``: ``weights``, ``density``, ``seed`` of :func:`forgetless.merging.merge_task_vectors`.
    """

    def __init__(self, base_model, finetuned_model, others: Iterable = (), merge: Optional[str] = None, **merge_options):
        self.model = plain_weights(finetuned_model)
        device = next(self.model.parameters()).device
        self.base_state = {k: v.detach().to(device, copy=True) for k, v in plain_weights(base_model).state_dict().items()}
        self.ft_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        _check_same_shapes(self.base_state, self.ft_state)
        self.groups: Optional[dict[str, str]] = None
        self.merged: dict = {}
        if merge is not None:
            vectors = [task_vector(self.base_state, self.ft_state)]
            for other in others:
                state = plain_weights(other).state_dict()
                _check_same_shapes(self.base_state, state)
                vectors.append(task_vector(self.base_state, state))
                del state, other
            merged = merge_task_vectors(vectors, merge, **merge_options)
            for k, d in merged.items():
                b = self.base_state[k]
                self.ft_state[k] = (b.float() + d.to(b.device)).to(b.dtype)
            changed = sum(int(torch.count_nonzero(d)) for v in vectors for d in v.values())
            self.merged = {"tensors": len(merged), "changed_entries": changed,
                           "kept_entries": sum(int(torch.count_nonzero(d)) for d in merged.values())}

    def use_groups(self, groups: int) -> list[str]:
        """Split the weights into ``groups`` block groups plus the outer group; their labels, in order."""
        self.groups = layer_groups(list(self.ft_state), groups)
        return group_order(self.groups)

    @torch.no_grad()
    def at(self, alpha: Union[float, Mapping[str, float]]) -> torch.nn.Module:
        """The working model at ``alpha``: one number, or one per group (after :meth:`use_groups`)."""
        live = self.model.state_dict()  # the model's own tensors: writing them sets the model
        for k, target in live.items():
            b, f = self.base_state[k], self.ft_state[k]
            a = alpha if isinstance(alpha, (int, float)) else alpha[self.groups[k]]
            target.copy_(torch.lerp(b.float(), f.float(), a) if f.is_floating_point() else f)
        return self.model



# ------------------------------------------------------------------------------------------------
# what interpolate and merge share: the runs over one base, the output, the merge of task vectors
# ------------------------------------------------------------------------------------------------


def _open_runs(given_runs: Sequence, base: Optional[str], dtype: str) -> tuple[list, object, int]:
    """The runs (run dir, is a run, model dir, run config) and their one base model (config, seed)."""
    import dataclasses

    from forgetless.config import ModelConfig, load_config
    from forgetless.models.loading import resolve_model_dir

    given_runs = [str(r) for r in given_runs]
    if len(set(given_runs)) < len(given_runs):
        raise UserError("a run is given twice; give each run to merge once")
    runs = []
    for r in given_runs:
        run_dir = Path(r)
        is_run = (run_dir / CONFIG_FILE).is_file() and (run_dir / MODEL_DIR).is_dir()
        ft_dir = resolve_model_dir(r)
        if not Path(ft_dir).is_dir():
            raise UserError(f"{r}: not a run or model directory; give a run directory or a fine-tuned model folder")
        runs.append((run_dir, is_run, ft_dir, load_config(run_dir / CONFIG_FILE) if is_run else None))

    def base_of(cfg):  # 'tiny' rebuilds the same random init from the seed; a QLoRA run's base is read unquantised
        return dataclasses.replace(cfg.model, dtype=dtype, device_map=None, load_in_4bit=False), cfg.train.seed

    if base is not None:
        return runs, ModelConfig(name_or_path=base, dtype=dtype), 0
    if not all(is_r for _, is_r, _, _ in runs):
        plain = next(r for r, is_r, _, _ in runs if not is_r)
        raise UserError(f"{plain}: not a run directory, so give the base model with --base")
    base_cfg, base_seed = base_of(runs[0][3])
    for r, _, _, cfg in runs[1:]:
        other, other_seed = base_of(cfg)
        if other != base_cfg or (base_cfg.name_or_path == "tiny" and other_seed != base_seed):
            raise UserError(f"{r}: its base model ({other.name_or_path}) is not {runs[0][0]}'s ({base_cfg.name_or_path}); "
                            f"task vectors are merged over one base")
    return runs, base_cfg, base_seed


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or choose --output")


def _merge_options(merge: Optional[str], density: Optional[float], weights: Optional[Sequence[float]], seed: Optional[int]) -> dict:
    if merge is None:
        return {}
    return {"weights": list(weights) if weights is not None else None, "density": density,
            "seed": (seed or 0) if merge in RANDOM_METHODS else 0}


def _interpolator(runs: list, base_cfg, base_seed: int, tokenizer, dtype: str, device, merge: Optional[str],
                  merge_options: dict, merge_flag: str = "--merge") -> "Interpolator":
    from forgetless.config import ModelConfig
    from forgetless.models import load_model, load_tokenizer

    ft_model = load_model(ModelConfig(name_or_path=runs[0][2], dtype=dtype), tokenizer).to(device)
    others = (load_model(ModelConfig(name_or_path=d, dtype=dtype), tokenizer).to(device) for _, _, d, _ in runs[1:])  # one at a time
    try:  # the base model is freed
        return Interpolator(load_model(base_cfg, load_tokenizer(base_cfg), seed=base_seed), ft_model, others, merge, **merge_options)
    except ValueError as e:  # the merge's own checks
        raise UserError(f"{merge_flag} {merge}: {e}") from None


def _merge_record(merge: str, runs: list, merge_options: dict, interp: "Interpolator") -> dict:
    return {"method": merge, "runs": [d for _, _, d, _ in runs],
            "density": (merge_options["density"] if merge_options["density"] is not None else DEFAULT_DENSITY)
            if merge in SPARSE_METHODS else None,
            "weights": merge_options["weights"] or [1.0] * len(runs),
            "seed": merge_options["seed"] if merge in RANDOM_METHODS else None, **interp.merged}


def merge_runs(
    runs: Sequence[str],
    *,
    method: str,
    output: str,
    scale: float = 1.0,
    base: Optional[str] = None,
    density: Optional[float] = None,
    weights: Optional[Sequence[float]] = None,
    seed: Optional[int] = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Merge the task vectors of ``runs`` (one base) by ``method`` and write ``base + scale * merged``.

    No data is scored: this is the fixed-strength merge for a user who knows the scale (1.0 is the
    papers' default for TIES and DARE). ``forgetless interpolate --merge`` scores a sweep of scales
    instead and picks one. Writes the model, its tokenizer and ``merge.json`` (what was merged, how).
    """
    if method is None:
        raise UserError(f"give --method: {', '.join(MERGE_METHODS)}")
    check_merge_flags(len(runs), (scale,), method, density, weights, seed, None, merge_flag="--method", alphas_flag="--scale")
    opened, base_cfg, base_seed = _open_runs(runs, base, dtype)
    out = Path(output)
    _check_output(out, overwrite)
    from forgetless.config import ModelConfig
    from forgetless.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=opened[0][2]))
    options = _merge_options(method, density, weights, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interp = _interpolator(opened, base_cfg, base_seed, tokenizer, dtype, device, method, options, merge_flag="--method")
    model = interp.at(scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    record = {"base": base_cfg.name_or_path, **_merge_record(method, opened, options, interp), "scale": scale,
              "formula": "base + scale * merged task vector", "output": str(out)}
    (out / MERGE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


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


def check_merge_flags(count: int, alphas: Sequence[float], merge: Optional[str], density: Optional[float],
                      weights: Optional[Sequence[float]], seed: Optional[int], per_layer: Optional[int],
                      merge_flag: str = "--merge", alphas_flag: str = "--alphas") -> None:
    """One-line UserErrors for options that do not go together (before anything is loaded).

    ``merge_flag`` / ``alphas_flag``: the flags' names in the command that calls (``forgetless
    merge`` names them ``--method`` and ``--scale``)."""
    top = MAX_MERGED_SCALE if merge is not None else 1.0
    if not alphas or any(not 0.0 <= a <= top for a in alphas):
        if merge is None:
            raise UserError(f"{alphas_flag} {list(alphas)}: give values between 0 and 1, e.g. 0,0.25,0.5,0.75,1")
        shown = ",".join(f"{a:g}" for a in alphas)
        raise UserError(f"{alphas_flag} {shown}: give lambdas between 0 and {top:g} (above 1 extrapolates the merged vector), e.g. 0,0.5,1")
    if merge is not None and merge not in MERGE_METHODS:
        raise UserError(f"{merge_flag} {merge}: use one of {', '.join(MERGE_METHODS)}")
    if count > 1 and merge is None:
        raise UserError(f"{count} runs: their task vectors are merged; give {merge_flag} {'|'.join(MERGE_METHODS)}")
    if density is not None and merge not in SPARSE_METHODS:
        raise UserError(f"--density goes with {merge_flag} {', '.join(SPARSE_METHODS)} (the share of each task vector they keep)")
    if density is not None and not 0.0 < density <= 1.0:
        raise UserError(f"--density {density:g}: give the share of entries to keep, in (0, 1], e.g. 0.2")
    if weights is not None and merge is None:
        raise UserError(f"--weights goes with {merge_flag}: one weight per run's task vector")
    if weights is not None and len(weights) != count:
        raise UserError(f"--weights: {len(weights)} weights for {count} runs; give one per run, in the runs' order")
    if seed is not None and merge not in RANDOM_METHODS:
        raise UserError(f"--seed goes with {merge_flag} {' or '.join(RANDOM_METHODS)} (the seed of DARE's random drop)")
    if per_layer is not None and per_layer < 1:
        raise UserError(f"--per-layer {per_layer}: give the number of block groups, at least 1 (e.g. 2, or the model's layer count)")


def run_interpolation(
    run_or_model: Union[str, Sequence[str]],
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
    merge: Optional[str] = None,
    density: Optional[float] = None,
    weights: Optional[Sequence[float]] = None,
    seed: Optional[int] = None,
    per_layer: Optional[int] = None,
) -> dict:
    """Sweep alpha between a base and a fine-tuned model, write the chosen model and the table.

    ``run_or_model`` is a forgetless run directory (its base model and eval / keep sets are
    taken from its config.yaml unless given) or a fine-tuned model directory (then ``base`` and
    the sets must be given); or several of them over one base, merged by ``merge`` (then ``output``
    must be given, and the default sets are the union of the runs': every run's eval sets are new,
    the other keep sets kept). ``merge``, ``density``, ``weights``, ``seed``: how the task vectors
    are merged (module docstring); ``per_layer``: that many block groups get alphas of their own.
    Both models are loaded in ``dtype`` (as ``model.dtype``) on the accelerator when there is one.
    """
    from forgetless.config import ModelConfig
    from forgetless.eval.run import load_eval_sets, score_sets
    from forgetless.models import load_model, load_tokenizer

    given_runs = [run_or_model] if isinstance(run_or_model, (str, Path)) else list(run_or_model)
    check_merge_flags(len(given_runs), alphas, merge, density, weights, seed, per_layer)
    runs, base_cfg, base_seed = _open_runs(given_runs, base, dtype)
    run_dir, is_run, ft_dir, run_cfg = runs[0]
    if output is None and len(runs) > 1:
        raise UserError(f"{len(runs)} runs are merged: choose where the merged model goes with --output")
    out = Path(output) if output else (run_dir / INTERPOLATED_DIR if is_run else Path(ft_dir).parent / INTERPOLATED_DIR)
    _check_output(out, overwrite)
    new, keep = dict(new or {}), dict(keep or {})
    if not new and not keep:
        for _, _, _, cfg in runs:
            if cfg is not None:
                for name, spec in (dict(cfg.data.eval) or {"task": cfg.data.train[0]}).items():
                    new.setdefault(name, spec)
        for _, _, _, cfg in runs:
            if cfg is not None:
                for name, spec in cfg.data.keep.items():
                    if name not in new:
                        keep.setdefault(name, spec)
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
    merge_options = _merge_options(merge, density, weights, seed)
    interp = _interpolator(runs, base_cfg, base_seed, tokenizer, dtype, device, merge, merge_options)
    groups = None
    if per_layer is not None:
        try:
            groups = interp.use_groups(per_layer)
        except ValueError as e:
            raise UserError(f"--per-layer {per_layer}: {e}") from None
    # each set's headline metric, as the run scored it (its DatasetSpec's metric, or the data's natural one)
    from forgetless.config import DatasetSpec
    from forgetless.eval.headline import higher_is_better
    from forgetless.eval.sets import make_eval_set
    from forgetless.data.formats import EncodeStats

    given = {**new, **keep}
    metrics = {name: make_eval_set(name, roles[name], examples, EncodeStats(),
                                   given[name].metric if isinstance(given[name], DatasetSpec) else None, generation, f"set {name}").metric
               for name, examples in sets.items()}
    grid = sorted(set(alphas))
    points = sweep(interp, tokenizer, sets, grid, batch_size=batch_size, generation=generation,
                   max_new_tokens=max_new_tokens, progress=progress, metrics=metrics)
    lower = frozenset(n for n, m in metrics.items() if not higher_is_better(m))
    chosen = select_alpha(points, roles, min_keep, lower)
    per_layer_result = None
    if groups is not None:
        reference = min(points, key=lambda p: p.alpha)  # the global rule's reference: the smallest alpha (the base at 0)

        def score(group_alphas: dict[str, float]) -> dict:
            label = "alphas " + ",".join(f"{a:g}" for a in group_alphas.values())
            return score_sets(interp.at(group_alphas), tokenizer, sets, batch_size=batch_size, generation=generation,
                              max_new_tokens=max_new_tokens, progress=progress, label=label, metrics=metrics)

        group_alphas, trials = search_per_layer(score, groups, chosen, grid, roles, min_keep, lower, reference)
        model = interp.at(group_alphas)
        per_layer_result = {"groups": groups, "alphas": group_alphas, "start_alpha": chosen.alpha,
                            "search": "one pass of coordinate search from the chosen global alpha, group by group",
                            "evaluations": len(trials), "trials": trials}
    else:
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
    if merge is not None:
        result["merge"] = {**_merge_record(merge, runs, merge_options, interp), "formula": "base + lambda * merged task vector"}
    if per_layer_result is not None:
        result["per_layer"] = per_layer_result
    (out / INTERPOLATION_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    with open(out / INTERPOLATION_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["alpha", "set", "role", "metric", "score", "loss", "token_accuracy", "exact_match"])
        for p in points:
            for name, m in p.scores.items():
                w.writerow([p.alpha, name, roles[name], metrics[name], m.get("score"), m.get("loss"), m.get("token_accuracy"), m.get("exact_match", "")])
    return result

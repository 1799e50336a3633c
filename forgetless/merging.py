"""Task vectors and how to merge them: pure functions on state dicts.

A *task vector* is what a fine-tune changed, ``tau = theta_finetuned - theta_base``, for every
floating-point tensor that changed (Ilharco et al. 2023, "Editing Models with Task Arithmetic").
Several task vectors over one base are merged into one, and the model becomes
``theta = theta_base + lambda * merge(tau_1, ..., tau_T)``:

- ``task_arithmetic``: the weighted sum ``Σ w_t tau_t``.
- ``magnitude``: each tau_t keeps its top ``density`` share of entries by magnitude, then the sum.
- ``ties`` (Yadav et al. 2023, "TIES-Merging"): trim each tau_t to its top ``density`` share by
  magnitude, elect a sign per entry (the sign of the sum of the trimmed values), and average only the
  values that agree with the elected sign (the *disjoint mean*: zeros and dissenters are not counted).
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language Models are Super Mario"): drop each
  entry with probability ``1 - density`` and rescale the survivors by ``1 / density`` (the expected
  vector is unchanged), then sum (linear) or elect signs and take the disjoint mean (ties).

What is PEFT's and what is ours. The merge arithmetic itself is ``peft.utils.merge_utils``
(``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``), called per
tensor. Ours: building the vectors from state dicts (a tensor missing from one vector counts as
zeros there), merging on the CPU in float32 whatever the models' device and dtype, and the seeding
of DARE's drop. PEFT draws that mask with ``torch.bernoulli`` from the global RNG; here each
tensor's call runs inside ``torch.random.fork_rng`` with the CPU generator seeded from ``seed`` and
the tensor's name, so a merge is reproducible, independent of merge order and of any other random
draw, and leaves the caller's random streams untouched.

Per-layer interpolation: ``theta = theta_base + alpha_g * tau`` with one alpha per group of
transformer blocks (:func:`layer_groups`). The tensors outside the blocks (embeddings, final norm,
output head) form a group of their own: they are shared by every block, and with tied embeddings the
input and output matrices are one tensor, which must have one alpha.
"""

from __future__ import annotations

import re
import warnings
import zlib
from typing import Mapping, Optional, Sequence

import torch

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude")
SPARSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude")  # the ones that take a density
RANDOM_METHODS = ("dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.2  # the TIES paper's top-20%; DARE works at this drop rate (0.8) too
OUTER_GROUP = "embeddings, norm, head"

# A transformer block's parameters: model.layers.3.*, transformer.h.3.*, blocks.3.* ...
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``finetuned - base`` in float32 on the CPU, for every floating tensor present in both that changed."""
    out = {}
    for name, f in finetuned.items():
        b = base.get(name)
        if b is None or not f.is_floating_point() or b.shape != f.shape:
            continue
        delta = f.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)
        if torch.count_nonzero(delta):
            out[name] = delta
    return out


def check_merge_options(method: str, density: Optional[float], weights: Optional[Sequence[float]], count: int) -> None:
    """Raise ValueError (one line) on options ``merge_task_vectors`` cannot use."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(MERGE_METHODS)}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if weights is not None and len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} task vectors; give one weight per vector")


def _seed_for(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def merge_task_vectors(vectors: Sequence[Mapping[str, torch.Tensor]], method: str, weights: Optional[Sequence[float]] = None,
                       density: Optional[float] = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One vector from ``vectors`` (name -> tensor each), merged per tensor by ``method``.

    ``weights``: one per vector (default 1 each); ``density``: the share of entries ``ties``,
    ``magnitude`` and DARE keep (default :data:`DEFAULT_DENSITY`; 1 keeps all, so ``ties`` at 1 is
    sign election and the disjoint mean alone); ``seed``: DARE's drop. Float32 on the CPU.
    """
    from peft.utils import merge_utils

    check_merge_options(method, density, weights, len(vectors))
    if not vectors:
        raise ValueError("no task vectors to merge")
    density = DEFAULT_DENSITY if density is None else density
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(vectors), dtype=torch.float32)
    names = list(dict.fromkeys(n for v in vectors for n in v))
    out = {}
    for name in names:
        like = next(v[name] for v in vectors if name in v)
        tensors = [v[name].detach().to("cpu", torch.float32) if name in v else torch.zeros(like.shape) for v in vectors]
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")  # density 1: keep all, as asked
            torch.random.default_generator.manual_seed(_seed_for(seed, name))  # the CPU generator only: fork_rng restores it
            if method == "task_arithmetic":
                merged = merge_utils.task_arithmetic(tensors, w)
            elif method == "magnitude":
                merged = merge_utils.magnitude_prune(tensors, w, density)
            else:
                merged = getattr(merge_utils, method)(tensors, w, density)
        out[name] = merged
    return out


def layer_groups(names: Sequence[str], groups: int) -> dict[str, str]:
    """Each tensor name's group: ``groups`` runs of consecutive transformer blocks (as even as can
    be, earlier groups larger), and :data:`OUTER_GROUP` for everything outside the blocks."""
    blocks = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if not blocks:
        raise ValueError("no transformer blocks found in the parameter names (e.g. model.layers.N.*), so no per-layer groups")
    count = max(blocks.values()) + 1
    if not 1 <= groups <= count:
        raise ValueError(f"{groups} groups for a model of {count} blocks; give 1 to {count}")
    size, extra = divmod(count, groups)
    bounds, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        bounds.append((start, end))
        start = end
    labels = [f"blocks {a}" if b - a == 1 else f"blocks {a}-{b - 1}" for a, b in bounds]
    block_label = {i: labels[g] for g, (a, b) in enumerate(bounds) for i in range(a, b)}
    return {n: block_label[blocks[n]] if n in blocks else OUTER_GROUP for n in names}


def group_order(groups: Mapping[str, str]) -> list[str]:
    """The group labels: blocks first to last, then the outer group (when it has tensors)."""
    labels = list(dict.fromkeys(g for g in groups.values() if g != OUTER_GROUP))
    labels.sort(key=lambda g: int(g.split()[1].split("-")[0]))
    return labels + ([OUTER_GROUP] if OUTER_GROUP in groups.values() else [])


def scale_per_group(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
                    groups: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``base + alpha_g * delta`` per tensor (g its group), in float32, cast back to the base's dtype;
    tensors without a delta stay the base's."""
    out = {}
    for name, b in base.items():
        d = delta.get(name)
        if d is None or not b.is_floating_point():
            out[name] = b
        else:
            out[name] = (b.float() + alphas[groups[name]] * d.to(b.device, torch.float32)).to(b.dtype)
    return out

"""Task vectors and their merges on hand tensors with known answers (forgetless.merging)."""

import pytest
import torch

from forgetless.interpolate import Interpolator, SweepPoint, interpolate_state, search_per_layer
from forgetless.merging import (
    OUTER_GROUP,
    group_order,
    layer_groups,
    merge_task_vectors,
    scale_per_group,
    task_vector,
)

T1 = torch.tensor([3.0, -1.0, 2.0, 0.5])
T2 = torch.tensor([-2.0, -1.5, 1.0, 0.1])
T3 = torch.tensor([1.0, 4.0, -5.0, 0.2])


def vectors(*tensors):
    return [{"w": t.clone()} for t in tensors]


def test_ties_elects_the_sign_of_the_sum_and_averages_only_agreeing_values():
    # density 1: no trimming. Sums [2, 1.5, -2, 0.8] elect signs [+, +, -, +]; the disjoint mean
    # averages the values of the elected sign only: (3 + 1) / 2, 4, -5, (0.5 + 0.1 + 0.2) / 3.
    got = merge_task_vectors(vectors(T1, T2, T3), "ties", density=1.0)["w"]
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0, -5.0, 0.8 / 3]))


def test_ties_trims_each_vector_to_its_largest_entries_first():
    # density 0.5 keeps 2 of 4 per vector: [3, 0, 2, 0], [-2, -1.5, 0, 0], [0, 4, -5, 0]. Sums [1, 2.5, -3, 0]
    # elect [+, +, -, +]; a trimmed zero has no sign and is not counted, so the all-zero entry stays 0.
    got = merge_task_vectors(vectors(T1, T2, T3), "ties", density=0.5)["w"]
    assert torch.equal(got, torch.tensor([3.0, 4.0, -5.0, 0.0]))


def test_ties_weights_scale_the_values_after_the_election():
    got = merge_task_vectors(vectors(T1, T2), "ties", weights=[1.0, 10.0], density=1.0)["w"]
    # signs from the unweighted sums [1, -2.5, 3, 0.6]: [+, -, +, +]; then the mean of the weighted agreeing values
    torch.testing.assert_close(got, torch.tensor([3.0, (-1.0 - 15.0) / 2, (2.0 + 10.0) / 2, (0.5 + 1.0) / 2]))


def test_task_arithmetic_is_the_weighted_sum_and_a_missing_tensor_counts_as_zero():
    a = {"w": T1.clone(), "only_a": torch.ones(2)}
    b = {"w": T2.clone()}
    got = merge_task_vectors([a, b], "task_arithmetic", weights=[0.5, 2.0])
    torch.testing.assert_close(got["w"], 0.5 * T1 + 2.0 * T2)
    torch.testing.assert_close(got["only_a"], torch.full((2,), 0.5))


def test_magnitude_keeps_the_largest_entries_then_sums():
    got = merge_task_vectors(vectors(T1), "magnitude", density=0.5)["w"]
    assert torch.equal(got, torch.tensor([3.0, 0.0, 2.0, 0.0]))


def test_dare_drops_about_one_minus_density_and_rescales_to_keep_the_expectation():
    delta = {"w": torch.full((100_000,), 3.0)}
    got = merge_task_vectors([delta], "dare_linear", density=0.3, seed=7)["w"]
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # ~30% survive
    assert torch.allclose(got[kept], torch.tensor(10.0))  # each survivor rescaled by 1 / density
    assert abs(got.mean().item() - 3.0) < 0.05  # E[merged] = delta


def test_dare_is_seeded_per_tensor_and_leaves_the_global_rng_alone():
    delta = {"a": torch.randn(1000), "b": torch.randn(1000)}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = merge_task_vectors([delta], "dare_ties", density=0.5, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    again = merge_task_vectors([delta], "dare_ties", density=0.5, seed=1)
    assert all(torch.equal(first[k], again[k]) for k in delta)
    other = merge_task_vectors([delta], "dare_ties", density=0.5, seed=2)
    assert not torch.equal(first["a"], other["a"])
    assert not torch.equal(first["a"] != 0, first["b"] != 0)  # each tensor draws its own mask
    only_a = merge_task_vectors([{"a": delta["a"]}], "dare_ties", density=0.5, seed=1)
    assert torch.equal(only_a["a"], first["a"])  # independent of the other tensors and their order


def test_dare_at_density_one_is_the_plain_merge():
    got = merge_task_vectors(vectors(T1, T2, T3), "dare_ties", density=1.0)["w"]
    torch.testing.assert_close(got, merge_task_vectors(vectors(T1, T2, T3), "ties", density=1.0)["w"])


def test_bad_merge_options():
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_task_vectors(vectors(T1), "average")
    with pytest.raises(ValueError, match="density"):
        merge_task_vectors(vectors(T1), "ties", density=0.0)
    with pytest.raises(ValueError, match="one weight per vector"):
        merge_task_vectors(vectors(T1, T2), "ties", weights=[1.0])


def test_task_vector_keeps_the_floating_tensors_that_changed():
    base = {"a": torch.zeros(3), "b": torch.ones(2), "step": torch.tensor([1, 2])}
    tuned = {"a": torch.tensor([0.0, 1.0, 0.0]), "b": torch.ones(2), "step": torch.tensor([5, 6])}
    got = task_vector(base, tuned)
    assert list(got) == ["a"] and torch.equal(got["a"], torch.tensor([0.0, 1.0, 0.0]))


NAMES = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)], "model.norm.weight", "lm_head.weight"]


def test_layer_groups_split_the_blocks_and_put_the_rest_in_one_outer_group():
    groups = layer_groups(NAMES, 3)  # 4 blocks in 3 groups: 2, 1, 1
    assert [groups[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == ["blocks 0-1", "blocks 0-1", "blocks 2", "blocks 3"]
    assert {groups[n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")} == {OUTER_GROUP}
    assert group_order(groups) == ["blocks 0-1", "blocks 2", "blocks 3", OUTER_GROUP]
    with pytest.raises(ValueError, match="4 blocks"):
        layer_groups(NAMES, 5)


def test_per_group_alphas_are_applied_exactly():
    base = {n: torch.randn(3) for n in NAMES}
    delta = {n: torch.randn(3) for n in NAMES if n != "model.norm.weight"}
    groups = layer_groups(NAMES, 2)
    alphas = {"blocks 0-1": 0.25, "blocks 2-3": 1.0, OUTER_GROUP: 0.0}
    got = scale_per_group(base, delta, alphas, groups)
    for n in NAMES:
        want = base[n] + alphas[groups[n]] * delta[n] if n in delta else base[n]
        assert torch.equal(got[n], want), n


def test_interpolator_takes_one_alpha_per_group():
    from forgetless.config import TinyModelConfig
    from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    shape = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    base, tuned = build_tiny_model(shape, tok, seed=0), build_tiny_model(shape, tok, seed=1)
    interp = Interpolator(base, tuned)
    labels = interp.use_groups(2)
    assert labels == ["blocks 0", "blocks 1", OUTER_GROUP]
    alphas = dict(zip(labels, (0.2, 0.7, 1.0)))
    state = interp.at(alphas).state_dict()
    for name, value in state.items():
        want = interpolate_state({name: interp.base_state[name]}, {name: interp.ft_state[name]}, alphas[interp.groups[name]])[name]
        assert torch.equal(value, want), name


def test_per_layer_search_is_one_coordinate_pass_by_the_global_rule():
    roles = {"new": "new", "old": "keep"}

    def scores(a: dict) -> dict:  # block group: learns and forgets; outer group: forgets only
        return {"new": {"score": a["blocks"]}, "old": {"score": 1.0 - 0.5 * a["blocks"] - 0.4 * a["outer"]}}

    calls = []

    def score(a):
        calls.append(dict(a))
        return scores(a)

    base = SweepPoint(0.0, scores({"blocks": 0.0, "outer": 0.0}))
    start = SweepPoint(0.5, scores({"blocks": 0.5, "outer": 0.5}))
    alphas, trials = search_per_layer(score, ["blocks", "outer"], start, [0.0, 0.5, 1.0], roles, 0.5, frozenset(), base)
    # blocks: 1.0 keeps 1 - 0.5 - 0.2 = 0.3 < 0.5, so 0.5 stays; outer: 0 keeps the most at the same new score
    assert alphas == {"blocks": 0.5, "outer": 0.0}
    assert len(trials) == len(calls) == 2 * 2

"""The forgetting budget's pure parts: the pooled KL, drops, the violation, the controller's step, the config checks."""

import math

import pytest
import torch
import torch.nn.functional as F

import forgetless
from forgetless.errors import ConfigError
from forgetless.data.batching import MixedBatches, Source
from forgetless.recipes.budget import (
    MAX_MIXED,
    aimed,
    next_log_scale,
    pooled_kl,
    sample_indices,
    score_drop,
    stream_shares,
    top_k_reference,
    worst_violation,
)


def full_kl(p_logits, q_logits):
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="sum")


def test_pooled_kl_is_the_full_kl_when_every_token_is_kept_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 50, generator=g) * 2, torch.randn(7, 50, generator=g) * 2
    ids, logp = top_k_reference(p, 50)
    torch.testing.assert_close(pooled_kl(q, ids, logp), full_kl(p, q), rtol=1e-5, atol=1e-6)
    previous = 0.0
    for k in (1, 5, 20, 49):  # coarser pooling never raises a KL; finer pooling gets closer
        ids, logp = top_k_reference(p, k)
        value = float(pooled_kl(q, ids, logp))
        assert 0.0 <= value <= float(full_kl(p, q)) + 1e-6
        assert value >= previous - 1e-6
        previous = value
    ids, logp = top_k_reference(p, 5)
    assert float(pooled_kl(p, ids, logp)) == pytest.approx(0.0, abs=1e-6)  # the model where it started


def test_pooled_kl_by_hand_on_three_tokens():
    p = torch.tensor([[0.7, 0.2, 0.1]]).log()
    q = torch.tensor([[0.5, 0.3, 0.2]]).log()
    ids, logp = top_k_reference(p, 1)  # keeps token 0; the rest pooled: 0.3 vs 0.5
    want = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert float(pooled_kl(q, ids, logp)) == pytest.approx(want, rel=1e-5)


def test_drops_violation_and_the_controllers_step():
    assert score_drop(0.8, 0.75, True) == pytest.approx(0.05)
    assert score_drop(2.0, 2.2, False) == pytest.approx(0.1)  # loss: relative rise
    assert score_drop(0.8, 0.9, True) == pytest.approx(-0.1)  # a gain is a negative drop
    limits = {"capitals": 0.02, "kl": 0.5}
    assert worst_violation({"capitals": 0.01, "kl": 0.25}, limits) == pytest.approx(-0.5)
    assert worst_violation({"capitals": 0.04, "kl": 0.25}, limits) == pytest.approx(1.0)
    assert worst_violation({"capitals": 0.0}, {"capitals": 0.0}) == 0.0  # a zero budget: judged against the floor
    assert worst_violation({"capitals": 0.1}, {}) is None
    assert next_log_scale(0.0, 0.5, 0.7, 0.01, 100) == pytest.approx(0.35)
    assert next_log_scale(0.0, 9.0, 0.7, 0.01, 100) == pytest.approx(0.7)  # clipped to one step
    assert next_log_scale(math.log(100), 1.0, 0.7, 0.01, 100) == pytest.approx(math.log(100))  # bounded
    assert next_log_scale(0.0, -1.0, 0.7, 0.9, 100) == pytest.approx(math.log(0.9))
    # the run's defaults: down at a quarter of the speed, up by up to two steps
    assert next_log_scale(0.0, -1.0, 0.7, 0.01, 100, relax=0.25, up_clip=2.0) == pytest.approx(-0.175)
    assert next_log_scale(0.0, 5.0, 0.7, 0.01, 100, relax=0.25, up_clip=2.0) == pytest.approx(1.4)
    assert next_log_scale(0.0, -1.0, 0.7, 0.01, 100, relax=0.0) == 0.0


def test_below_aim_1_the_controller_steers_inside_the_limit():
    """A drop at the limit holds the strength at aim 1 and raises it at aim 0.9 (a margin for the
    keep sample's noise); whether the run is inside is judged against the limit either way."""
    limits, drops = {"capitals": 0.5}, {"capitals": 0.5}
    assert worst_violation(drops, limits) == 0.0
    steer = worst_violation(drops, aimed(limits, 0.9))
    assert steer == pytest.approx(0.5 / 0.45 - 1)
    assert next_log_scale(0.0, worst_violation(drops, aimed(limits, 1.0)), 0.7, 0.01, 100, 0.25, 2) == 0.0
    assert next_log_scale(0.0, steer, 0.7, 0.01, 100, 0.25, 2) == pytest.approx(0.7 * steer)


def test_stream_shares_scale_the_controlled_streams_and_the_task_takes_the_rest():
    start = [0.6, 0.25, 0.15]  # task, replay (controlled), mix (not)
    assert stream_shares(start, {1: 0.25}, 2.0) == pytest.approx([0.35, 0.5, 0.15])
    assert stream_shares(start, {1: 0.25}, 0.1) == pytest.approx([0.825, 0.025, 0.15])
    capped = stream_shares(start, {1: 0.25}, 100.0)  # mixed-in data at most MAX_MIXED of a batch
    assert sum(capped[1:]) == pytest.approx(MAX_MIXED) and capped[2] == 0.15


def test_changed_shares_draw_from_the_next_step_and_streams_go_on_where_they_were():
    sources = [Source("task", list(range(40)), 0.75), Source("replay", list(range(100, 140)), 0.25)]
    same = MixedBatches(sources, 8, seed=0)
    changed = MixedBatches(sources, 8, seed=0)
    changed.set_shares(5, [0.25, 0.75])
    assert [changed.batch(s) for s in range(5)] == [same.batch(s) for s in range(5)]
    drawn = [j for s in range(5, 25) for j, _ in changed.batch(s)]
    assert drawn.count(1) / len(drawn) == pytest.approx(0.75, abs=1 / 8)
    # every source's positions go on without a gap or a repeat: 40 replay examples, each once per pass
    replay = [i for s in range(0, 10) for j, i in changed.batch(s) if j == 1]  # 5 x 2 + 5 x 6: one pass
    assert len(replay) == 40 and len(set(replay)) == 40
    assert changed.segments == [(0, [0.75, 0.25]), (5, [0.25, 0.75])]


def test_samples_are_fixed_and_seeded():
    assert sample_indices(10, None, 0) == list(range(10)) == sample_indices(10, 20, 0)
    a, b = sample_indices(100, 8, 3), sample_indices(100, 8, 3)
    assert a == b and len(set(a)) == 8 and a == sorted(a) and a != sample_indices(100, 8, 4)


BASE = ["model.name_or_path=tiny", "data.train=demo:elements"]


@pytest.mark.parametrize("overrides, message", [
    (["data.eval.x={path: demo:capitals, max_drop: 0.1}"], "data.eval.x.max_drop: a forgetting budget belongs to a data.keep set"),
    (["data.eval.keep={path: demo:capitals, max_drop: 0.1}"], "data.eval.keep.max_drop: a forgetting budget belongs to a data.keep set"),
    (["data.keep.online_kl=demo:capitals", "budget.kl_max=1", "methods.kl=true"], "the name is the budget's KL limit"),
    (["data.train={path: demo:elements, max_drop: 0.1}"], "data.train[0].max_drop: a forgetting budget belongs to a data.keep set"),
    (["data.keep.c={path: demo:capitals, max_drop: -1}"], "max_drop must be >= 0"),
    (["data.keep.c={path: demo:capitals, max_drop: 0.1}"], "budget: no method whose strength the controller can adjust"),
    (["budget.kl_max=0.5"], "add one (ewc, kl, l2sp, mix, replay, synthetic_replay)"),
    (["data.keep.c={path: demo:capitals, max_drop: 0.1}", "methods.kl=true", "eval.before=false"], "needs the scores before training"),
    (["budget.kl_max=0.5", "methods.kl=true", "budget.every_steps=0"], "the controller needs checks"),
    (["budget.kl_max=0"], "kl_max must be positive"),
    (["budget.min_scale=2"], "0 < min_scale <= 1 <= max_scale"),
    (["budget.keep_sample=0"], "keep_sample must be at least 1"),
    (["budget.aim=0"], "aim must be in (0, 1]"),
    (["budget.aim=1.2"], "aim must be in (0, 1]"),
])
def test_budget_options_are_checked_with_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        forgetless.load_config(None, [*BASE, *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_budget_without_control_needs_no_protective_method():
    cfg = forgetless.load_config(None, [*BASE, "data.keep.c={path: demo:capitals, max_drop: 0.1}", "budget.control=false"])
    assert cfg.data.keep["c"].max_drop == 0.1

from collections import Counter

import pytest

from forgetless.data.batching import MixedBatches, Source, chunks, collate, count_targets, shard
from forgetless.data.formats import IGNORE, Example


def _src(name, n, w):
    return Source(name, [Example([i], [i], name) for i in range(n)], w)


def test_same_seed_same_order_and_epochs_cover_everything():
    a, b = MixedBatches([_src("t", 10, 1)], 4, seed=3), MixedBatches([_src("t", 10, 1)], 4, seed=3)
    assert [a.batch(s) for s in range(5)] == [b.batch(s) for s in range(5)]
    # the first 10 positions of the stream are one pass over the data (order within a batch is shuffled)
    stream = [i for s in range(5) for _, i in sorted(a.batch(s))]
    assert sorted(stream[:8]) == sorted(set(stream[:8])) and sorted(set(stream[:12])) == list(range(10))
    assert MixedBatches([_src("t", 10, 1)], 4, seed=4).batch(0) != a.batch(0)
    assert a.steps_for_epochs(1) == 3 and a.steps_for_epochs(2.5) == 7


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.25, 0.25), (0.9, 0.1), (0.55, 0.45)])
def test_observed_shares_match_the_requested_ones(weights):
    sources = [_src(f"s{j}", 37 + 11 * j, w) for j, w in enumerate(weights)]
    mb = MixedBatches(sources, global_batch=10, seed=0)
    steps = mb.steps_for_epochs(1)
    counts = Counter(j for s in range(steps) for j, _ in mb.batch(s))
    total = sum(counts.values())
    assert total == steps * 10
    for j, w in enumerate(weights):
        assert abs(counts[j] / total - w) <= 0.02  # within 2 percentage points over an epoch
        # and at every prefix of the run, within one example of the quota
        assert abs(mb._given(steps)[j] - steps * 10 * w / sum(weights)) <= 1


def test_no_source_gives_back_an_example_and_every_batch_is_whole():
    """Rounding cumulative quotas afresh can take an example back from one of 3+ sources (the
    apportionment paradox: a batch then had global_batch + 1 pairs, and shard dropped one). The
    counts are built step by step instead: never decreasing, within one example of the quotas, and
    the same as before wherever that was already monotone (so seeded runs keep their batches)."""
    import random

    rng = random.Random(0)
    paradox = 0
    for _ in range(200):
        weights = [rng.random() for _ in range(rng.randint(3, 5))]
        mb = MixedBatches([_src(f"s{j}", 50, w) for j, w in enumerate(weights)], global_batch=rng.randint(3, 9), seed=0)
        if rng.random() < 0.5:  # and with shares a controller changes mid-run
            mb.set_shares(20, [rng.random() + 0.01 for _ in weights])
        old = [mb._rounded(s) for s in range(51)]  # the cumulative quotas rounded afresh: the old counts
        old_monotone = all(b >= a for s in range(50) for a, b in zip(old[s], old[s + 1]))
        paradox += not old_monotone
        counts = [mb._given(s) for s in range(51)]
        for s in range(50):
            assert all(b >= a for a, b in zip(counts[s], counts[s + 1]))
            assert len(mb.batch(s)) == mb.global_batch
            assert all(abs(c - q) < 1 + 1e-9 for c, q in zip(counts[s + 1], mb._quotas(s + 1)))
        if old_monotone:
            assert counts == old
    assert paradox > 0  # the check met the paradox it guards against


def test_shards_of_all_processes_make_the_global_batch():
    g = MixedBatches([_src("t", 50, 1)], 8, seed=0)
    for step in range(4):
        full = g.batch(step)
        assert shard(full, 0, 2) + shard(full, 1, 2) == full
        assert shard(full, 0, 1) == full


def test_collate_pads_right_and_masks():
    exs = [Example([5, 6, 7], [IGNORE, 6, 7], "a"), Example([8, 9], [8, 9], "b")]
    t = collate(exs, pad_id=0)
    assert t["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert t["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert t["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert count_targets(t["labels"]) == 3  # the first position is never predicted
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_micro_batches_group_similar_lengths_and_keep_every_example():
    from forgetless.data.batching import micro_batches

    lengths = [30, 3, 28, 4, 29, 2, 31, 5]  # long task sequences interleaved with short mixed-in ones
    exs = [Example(list(range(1, n + 1)), list(range(1, n + 1)), "x") for n in lengths]
    grouped = micro_batches(exs, 4, pad_id=0)
    naive = [collate(g, 0) for g in chunks(exs, 4)]
    cells = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    real = sum(lengths)
    assert cells(grouped) - real < (cells(naive) - real) / 4  # padding mostly gone
    assert sum(int(b["attention_mask"].sum()) for b in grouped) == real
    assert sum(count_targets(b["labels"]) for b in grouped) == sum(count_targets(b["labels"]) for b in naive)
    assert [b["input_ids"].shape for b in grouped] == [b["input_ids"].shape for b in micro_batches(exs, 4, 0)]  # deterministic

    # one micro-batch of long task sequences and short mixed-in ones is split, never over the memory budget
    one = micro_batches(exs, 8, pad_id=0)
    assert [tuple(b["input_ids"].shape) for b in one] == [(4, 31), (3, 5), (1, 2)]  # at most half padding
    assert all(b["input_ids"].numel() <= 8 * 31 for b in one)
    same = [Example([1] * n, [1] * n, "x") for n in (10, 9, 8, 7, 6, 10, 9, 8)]
    assert [tuple(b["input_ids"].shape) for b in micro_batches(same, 4, 0)] == [(4, 10), (4, 8)]  # similar lengths: size per micro-batch
    short = [Example([1] * 40, [1] * 40, "x")] + [Example([1] * 25, [1] * 25, "x")] * 6
    assert [b["input_ids"].shape[0] for b in micro_batches(short, 2, 0)] == [2, 3, 2]  # budget 2 x 40 cells

from forgetless.data.batching import GlobalBatches, chunks, collate, count_targets, shard
from forgetless.data.formats import IGNORE, Example


def test_same_seed_same_order_and_epochs_cover_everything():
    a, b = GlobalBatches(10, 4, seed=3), GlobalBatches(10, 4, seed=3)
    assert [a.indices(s) for s in range(5)] == [b.indices(s) for s in range(5)]
    first_epoch = [i for s in range(5) for i in a.indices(s)][:10]
    assert sorted(first_epoch) == list(range(10))
    assert GlobalBatches(10, 4, seed=4).indices(0) != a.indices(0)
    assert a.steps_for_epochs(1) == 3 and a.steps_for_epochs(2.5) == 7


def test_shards_of_all_processes_make_the_global_batch():
    g = GlobalBatches(50, 8, seed=0)
    for step in range(4):
        full = g.indices(step)
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

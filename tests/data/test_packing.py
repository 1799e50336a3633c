"""data.packing: several examples per row (best-fit decreasing), each attending only to itself; same loss and gradients."""

import pytest
import torch

from forgetless.config import ModelConfig, TinyModelConfig
from forgetless.data.batching import collate, collate_packed, count_targets, micro_batches, pack, packed_micro_batches, predicting
from forgetless.data.formats import IGNORE, Example
from forgetless.errors import ConfigError
from forgetless.loss import check_packing, forward
from forgetless.models import load_model, load_tokenizer

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def ex(n: int, start: int = 5, prompt: int = 0) -> Example:
    ids = [start + i for i in range(n)]
    return Example(ids, [IGNORE] * prompt + ids[prompt:], "r")


def test_best_fit_decreasing_on_hand_lengths():
    examples = [ex(n) for n in (2, 6, 3, 5, 4)]
    rows = pack(examples, capacity=10)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[6, 4], [5, 3, 2]]
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in examples)  # each example once
    assert all(sum(len(e.input_ids) for e in r) <= 10 for r in rows)
    assert [len(r) for r in pack([ex(10), ex(10)], 10)] == [1, 1]  # a full row takes nothing more


def test_a_packed_row_restarts_positions_and_never_predicts_across_examples():
    a, b = ex(4, 10), ex(3, 20, prompt=1)
    batch = collate_packed([[a, b]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, 13, IGNORE, 21, 22]]
    assert "attention_mask" in batch and batch["attention_mask"].sum() == 7
    # the same targets as the two examples unpacked
    assert count_targets(batch["labels"]) == count_targets(collate([a], 0)["labels"]) + count_targets(collate([b], 0)["labels"])
    assert predicting(batch).tolist() == [[True, True, True, False, True, True]]


@pytest.fixture(scope="module")
def model_and_examples():
    cfg = ModelConfig(name_or_path="tiny", tiny=SHAPE)
    tok = load_tokenizer(cfg)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(11):
        n = int(torch.randint(3, 30, (1,), generator=g))
        ids = torch.randint(5, len(tok), (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * (i % 3) + ids[i % 3:], "r"))
    return load_model(cfg, tok, seed=0), examples


def _loss_and_grads(model, batches):
    model.zero_grad()
    total = 0.0
    for b in batches:
        out = forward(model, b["input_ids"], b["attention_mask"], position_ids=b.get("position_ids"))
        loss = out.token_loss(b["labels"])[0]
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_and_unpacked_give_the_same_loss_and_gradients(model_and_examples):
    model, examples = model_and_examples
    plain = micro_batches(examples, 4, pad_id=0)
    packed = packed_micro_batches(examples, 2, capacity=64, pad_id=0)
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in plain)  # less padding
    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_that_ignores_the_positions_is_refused(model_and_examples):
    model, examples = model_and_examples
    check_packing(model, examples, pad_id=0)  # transformers' Llama keeps them apart

    class Leaky(torch.nn.Module):  # a model whose attention spans the whole row
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, attention_mask=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    with pytest.raises(ConfigError, match="data.packing: this model .* lets the examples packed in a row attend to each other"):
        check_packing(Leaky(model), examples, pad_id=0)


@pytest.mark.slow
def test_a_packed_run_trains_like_an_unpacked_one(tmp_path, pc_file):
    import json

    import forgetless
    from tests.conftest import fast_overrides

    losses = {}
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        cfg = forgetless.load_config(None, fast_overrides(out, pc_file, f"data.packing={str(packing).lower()}", "methods.kl.weight=0.5",
                                                         "methods.kl.positions=all", "output.log_every=1", "train.max_steps=3"))
        forgetless.train(cfg)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [r for r in records if "loss" in r]
    assert len(losses[True]) == 3
    for a, b in zip(losses[False], losses[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["target_tokens"] == a["target_tokens"]
        assert b["terms"]["kl"] == pytest.approx(a["terms"]["kl"], rel=1e-4, abs=1e-7)

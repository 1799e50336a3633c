"""Gradient accumulation gives the gradient of the token-mean loss over the whole batch."""

import torch
from accelerate import Accelerator

from forgetless.config import TinyModelConfig
from forgetless.data.batching import collate, count_targets
from forgetless.data.formats import IGNORE, Example
from forgetless.loss import token_cross_entropy
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from forgetless.recipes.finetune import forward_backward


def _examples():
    # very different numbers of target tokens per sequence, where a mean of means goes wrong
    g = torch.Generator().manual_seed(0)
    exs = []
    for n, k in [(30, 25), (6, 2), (12, 1), (20, 18)]:
        ids = torch.randint(4, 1000, (n,), generator=g).tolist()
        exs.append(Example(ids, [IGNORE] * (n - k) + ids[n - k :], "x"))
    return exs


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def test_accumulated_gradient_equals_full_batch_token_mean():
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok, seed=0)
    acc = Accelerator(cpu=True)
    exs = _examples()

    full = collate(exs, tok.pad_token_id)
    loss_sum, _ = token_cross_entropy(model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits, full["labels"])
    (loss_sum / count_targets(full["labels"])).backward()
    reference = _grads(model)
    model.zero_grad()

    micro = [collate(exs[:1], tok.pad_token_id), collate(exs[1:3], tok.pad_token_id), collate(exs[3:], tok.pad_token_id)]
    total = sum(count_targets(b["labels"]) for b in micro)
    returned = forward_backward(model, micro, acc, scale=1 / total)["lm"]
    accumulated = _grads(model)
    torch.testing.assert_close(accumulated, reference, rtol=1e-5, atol=1e-7)
    assert abs(returned.item() - loss_sum.item()) < 1e-3

    # the naive mean of micro-batch means gives a different gradient on this data
    model.zero_grad()
    for b in micro:
        s, _ = token_cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        (s / count_targets(b["labels"]) / len(micro)).backward()
    assert not torch.allclose(_grads(model), reference, rtol=1e-3, atol=1e-6)

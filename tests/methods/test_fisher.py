"""The diagonal Fisher: vectorised per-example gradients against the one-example-at-a-time reference."""

import warnings

import pytest
import torch

from forgetless.config import TinyModelConfig, load_config
from forgetless.data.formats import IGNORE, Encoder
from forgetless.methods import fisher
from forgetless.methods.fisher import diagonal_fisher, fisher_loop, fisher_vmap, sample_labels
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
from forgetless.recipes.finetune import encode_dataset

SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    cfg = load_config(None, ["data.train={path: demo:capitals, limit: 7}", "data.max_length=48"])
    exs, _ = encode_dataset(Encoder(tok, cfg.data), cfg.data.train)
    assert len({len(e.input_ids) for e in exs}) > 1, "the test needs variable-length (padded) examples"
    return exs


def tiny(tok, dtype=torch.float32):
    return build_tiny_model(SHAPE, tok, seed=0).to(dtype)


def close(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=rtol * float(b[n].abs().max()), msg=n)


def test_vectorised_equals_loop(tok, examples):
    model = tiny(tok, torch.float64).eval()
    loop = fisher_loop(model, examples)
    # 7 examples in chunks of 3: padded chunks of different widths, and a short last chunk
    close(fisher_vmap(model, examples, tok.pad_token_id, chunk_size=3), loop)
    assert all(v.dtype == torch.float64 for v in loop.values())
    assert sum(float(v.sum()) for v in loop.values()) > 0


def test_vectorised_equals_loop_on_sampled_labels(tok, examples):
    model = tiny(tok, torch.float64).eval()
    sampled = sample_labels(model, examples, tok.pad_token_id, seed=3, chunk_size=4)
    close(fisher_vmap(model, sampled, tok.pad_token_id, chunk_size=2), fisher_loop(model, sampled))


def test_fisher_is_the_mean_of_per_example_squares(tok, examples):
    """Mean of squared per-example gradients: additive over examples (a squared sum would not be)."""
    model = tiny(tok, torch.float64).eval()
    a, b = examples[:2], examples[2:5]
    fa, fb = diagonal_fisher(model, a, tok.pad_token_id), diagonal_fisher(model, b, tok.pad_token_id)
    both = diagonal_fisher(model, a + b, tok.pad_token_id)
    close(both, {n: (2 * fa[n] + 3 * fb[n]) / 5 for n in fa})
    # one example: F is its squared gradient
    e = examples[0]
    logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
    loss = fisher._example_loss(logits, torch.tensor(e.labels))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    close(diagonal_fisher(model, [e], tok.pad_token_id), {n: g**2 for (n, _), g in zip(model.named_parameters(), grads)})


def test_sampled_fisher_differs_from_empirical_and_is_reproducible(tok, examples):
    model = tiny(tok)
    empirical = diagonal_fisher(model, examples, tok.pad_token_id, "empirical")
    s1 = diagonal_fisher(model, examples, tok.pad_token_id, "sampled", seed=1)
    s1_again = diagonal_fisher(model, examples, tok.pad_token_id, "sampled", seed=1, chunk_size=2)
    s2 = diagonal_fisher(model, examples, tok.pad_token_id, "sampled", seed=2)
    close(s1_again, s1, rtol=1e-5)  # same seed, other chunking: same labels
    n = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(s1[n], empirical[n], rtol=1e-2)
    assert not torch.allclose(s1[n], s2[n], rtol=1e-2)


def test_sampled_labels_only_replace_targets(tok, examples):
    model = tiny(tok)
    sampled = sample_labels(model, examples, tok.pad_token_id, seed=0)
    changed = 0
    for e, s in zip(examples, sampled):
        assert s.input_ids == e.input_ids
        assert [t == IGNORE for t in s.labels] == [t == IGNORE for t in e.labels]
        changed += sum(a != b for a, b in zip(s.labels, e.labels))
    assert changed > 0  # a random model rarely predicts the data


def test_only_trainable_parameters_and_eval_mode(tok, examples):
    model = tiny(tok)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    f = diagonal_fisher(model, examples[:3], tok.pad_token_id)
    assert set(f) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen and not any(seen), "the Fisher must be computed in eval mode (no dropout)"
    assert model.training, "the previous mode is restored"


def test_falls_back_to_the_loop_with_one_warning(tok, examples, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("vmap: this op has no batching rule")

    monkeypatch.setattr(fisher, "fisher_vmap", broken)
    monkeypatch.setattr(fisher, "_warned_fallback", False)
    model = tiny(tok, torch.float64)
    with pytest.warns(UserWarning, match="one example at a time"):
        f = diagonal_fisher(model, examples[:3], tok.pad_token_id)
    close(f, fisher_loop(model.eval(), examples[:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diagonal_fisher(model, examples[:2], tok.pad_token_id)  # warned once only


def test_vectorised_with_gradient_checkpointing_enabled(tok, examples):
    """transformers' input-grad hook (added with checkpointing) must not push us onto the loop."""
    model = tiny(tok, torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="per-example gradients")
        f = diagonal_fisher(model, examples[:4], tok.pad_token_id)
    assert model._require_grads_hook is not None, "the hook is put back"
    close(f, fisher_loop(model.eval(), examples[:4]))


def test_unknown_kind(tok, examples):
    with pytest.raises(ValueError, match="unknown Fisher kind 'exact'"):
        diagonal_fisher(tiny(tok), examples, tok.pad_token_id, "exact")

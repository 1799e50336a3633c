"""The loss applies the output head at the scored rows only, in chunks: same values and gradients as full logits."""

import pytest
import torch

import forgetless.loss as loss_module
from forgetless.config import TinyModelConfig
from forgetless.data.formats import IGNORE
from forgetless.loss import Outputs, forward, kl_sum, kl_sum_chunked, target_positions, token_cross_entropy
from forgetless.methods.kl import base_head
from forgetless.models.adapters import adapters_disabled
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def _model(seed=0):
    tok = load_tiny_tokenizer()
    return build_tiny_model(TINY, tok, seed=seed), tok


def _batch(vocab, rows=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :6] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    return ids, mask, labels


def _assert_close(got, want, name, tol=1e-6):
    """Equal to ``tol`` relative to the gradient's largest entry (float summation order differs)."""
    assert (got - want).abs().max() <= tol * want.abs().max(), name


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_chunks(monkeypatch):
    # a few rows per chunk, so that every batch here is several chunks
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * load_tiny_tokenizer().vocab_size)


def test_token_loss_equals_full_logits_in_value_and_gradients(small_chunks):
    model, tok = _model()
    ids, mask, labels = _batch(tok.vocab_size)
    full_logits = model(input_ids=ids, attention_mask=mask).logits
    want, want_correct = token_cross_entropy(full_logits, labels)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    out = forward(model, ids, mask)
    assert out.logits is None and out.hidden.shape == (*ids.shape, TINY.hidden_size)  # no full logits
    assert int(target_positions(labels).sum()) > out.chunk_rows() * 3
    got, got_correct = out.token_loss(labels)
    got.backward()
    got_grads = _grads(model)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(got_correct, want_correct)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        _assert_close(got_grads[n], want_grads[n], n)


@pytest.mark.parametrize("chunked", [False, True])
def test_kl_chunked_equals_full_logits_in_value_and_gradients(chunked, monkeypatch):
    """One chunk: bit-identical to the full logits. Several: equal to float32 rounding.

    A KL sums p·(log p − log q) terms that cancel (its gradient is p_s − p_t), so float32
    summation order shows at a few 1e-6: the full-logits gradient itself is 3.8e-6 away from a
    float64 reference here, the chunked one 3.2e-6.
    """
    vocab = load_tiny_tokenizer().vocab_size
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * vocab if chunked else 2**25)
    student, tok = _model(seed=0)
    teacher, _ = _model(seed=1)
    teacher.requires_grad_(False)
    ids, mask, labels = _batch(tok.vocab_size)
    select = target_positions(labels)
    T = 1.7
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    want = kl_sum(s_logits[:, :-1][select], t_logits[:, :-1][select], T)
    want.backward()
    want_grads = _grads(student)
    student.zero_grad(set_to_none=True)

    with torch.no_grad():
        t_out = forward(teacher, ids, mask)
    s_out = forward(student, ids, mask)
    assert (int(select.sum()) > 3 * s_out.chunk_rows()) == chunked
    got = kl_sum_chunked(s_out, t_out, select, T)
    got.backward()
    if not chunked:
        assert got.item() == want.item()
        assert all(torch.equal(g, want_grads[n]) for n, g in _grads(student).items())
        return
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for n, g in want_grads.items():
        _assert_close(_grads(student)[n], g, n, tol=1e-5)


def test_a_lora_head_gives_the_base_logits_in_the_backward_pass_too(small_chunks):
    """The teacher head of an adapter model runs with adapters off, also when a chunk is recomputed."""
    from peft import LoraConfig, get_peft_model

    base, tok = _model()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    ids, mask, labels = _batch(tok.vocab_size)
    select = target_positions(labels)
    with torch.no_grad(), adapters_disabled(model):
        t_logits = model(input_ids=ids, attention_mask=mask).logits
    s_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(s_logits, t_logits)
    want = kl_sum(s_logits[:, :-1][select], t_logits[:, :-1][select], 1.0)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    with torch.no_grad(), adapters_disabled(model):
        t_out = forward(model, ids, mask)
    t_out.head = base_head(model)
    assert t_out.head is not model.get_output_embeddings()
    got = kl_sum_chunked(forward(model, ids, mask), t_out, select, 1.0)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for n, g in want_grads.items():
        _assert_close(_grads(model)[n], g, n, tol=1e-5)


def test_a_head_that_is_not_the_logits_falls_back_to_full_logits():
    """A model that changes its logits after the head (e.g. soft-capping) is detected on its first batch."""
    model, tok = _model()
    ids, mask, labels = _batch(tok.vocab_size)
    want, _ = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    model.get_output_embeddings = lambda: torch.nn.Identity()  # not what the model applies
    out = forward(model, ids, mask)
    assert out.logits is not None and out.logits.shape[:2] == ids.shape
    assert getattr(model, loss_module._HEAD_CHECKED) is False
    got, _ = out.token_loss(labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert forward(model, ids, mask).logits is not None  # decided once


def test_bf16_autocast_matches_the_model_own_logits():
    model, tok = _model()
    ids, mask, labels = _batch(tok.vocab_size)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), autocast():
        want, _ = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    with torch.no_grad(), autocast():  # accelerate runs the prepared model's forward under autocast
        out = forward(model, ids, mask, autocast=autocast)
    with torch.no_grad():
        got, _ = out.token_loss(labels)  # the head under the recipe's autocast too
    assert out.logits is None
    assert got.item() == pytest.approx(want.item(), rel=1e-3)


def test_logits_at_selected_rows():
    model, tok = _model()
    ids, mask, labels = _batch(tok.vocab_size)
    select = target_positions(labels)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        rows = forward(model, ids, mask).logits_at(select)
    torch.testing.assert_close(rows, full[:, :-1][select], rtol=1e-5, atol=1e-5)
    empty = Outputs(None, None, 10, logits=torch.zeros(2, 3, 10, requires_grad=True))
    assert empty.anchor().requires_grad and empty.anchor().item() == 0

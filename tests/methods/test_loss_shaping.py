"""DFT and EAFT: the token weights equal their formulas on hand-made distributions; the term turns the plain loss into theirs."""

import math

import pytest
import torch
import torch.nn.functional as F

from forgetless.data.formats import IGNORE
from forgetless.loss import Outputs, forward
from forgetless.methods.dft import DFT, DFTConfig, dft_weights
from forgetless.methods.eaft import EAFT, EAFTConfig, eaft_weights


def test_dft_weight_is_the_target_probability():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    torch.testing.assert_close(dft_weights(logits, torch.tensor([0, 2])), torch.tensor([0.7, 0.5]))


def test_eaft_weight_is_the_normalised_top_k_entropy():
    uniform = torch.zeros(1, 5)
    sure = torch.tensor([[50.0, 0.0, 0.0, 0.0, 0.0]])
    assert float(eaft_weights(uniform, 5)) == pytest.approx(1.0)
    assert float(eaft_weights(sure, 5)) == pytest.approx(0.0, abs=1e-12)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # top 2: 0.5, 0.3 renormalised to 0.625, 0.375
    p = torch.tensor([0.625, 0.375])
    assert float(eaft_weights(logits, 2)) == pytest.approx(float(-(p * p.log()).sum() / math.log(2)), rel=1e-6)


@pytest.mark.parametrize("method", [DFT(DFTConfig()), EAFT(EAFTConfig(top_k=3))])
def test_the_term_makes_the_loss_the_weighted_one_with_the_documented_gradient(method):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE, 3, 1, IGNORE, 2], [IGNORE, IGNORE, 6, 0, 4]])
    out = Outputs(None, None, 7, logits=logits)
    plain, _ = out.token_loss(labels)
    term = method.batch_terms(None, {"labels": labels}, out)[method.name]
    rows = logits[:, :-1][labels[:, 1:] != IGNORE]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    w = dft_weights(rows.detach(), targets) if method.name == "dft" else eaft_weights(rows.detach(), 3)
    want = (w * F.cross_entropy(rows, targets, reduction="none")).sum()
    torch.testing.assert_close(plain + term, want)
    (g,) = torch.autograd.grad(plain + term, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g, g_want)  # the weights are constants: no gradient through them


def test_the_chunked_head_gives_the_same_term_as_full_logits():
    from forgetless.config import ModelConfig, TinyModelConfig
    from forgetless.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1))
    model = load_model(cfg, load_tokenizer(cfg))
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    mask = torch.ones_like(ids)
    chunked = forward(model, ids, mask)
    full = Outputs(None, None, chunked.vocab_size, logits=model(input_ids=ids, attention_mask=mask).logits)
    for method in (DFT(DFTConfig()), EAFT(EAFTConfig())):
        a = method.batch_terms(model, {"labels": labels}, chunked)[method.name]
        b = method.batch_terms(model, {"labels": labels}, full)[method.name]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


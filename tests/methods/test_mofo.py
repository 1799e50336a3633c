"""MoFO: each step moves exactly the chosen share of every parameter tensor, those of largest momentum; the rest stays bit-identical."""

import pytest
import torch

from forgetless.methods.mofo import MoFO, MoFOConfig, chosen
from tests.methods.conftest import forgot


def test_chosen_is_the_top_fraction_by_magnitude():
    m = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    mask = chosen(m, 1 / 3)
    assert mask.sum() == 2 and mask[0, 1] and mask[1, 0]
    assert chosen(m, 1e-9).sum() == 1  # at least one entry per block
    assert chosen(m, 1.0).all()


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 16, generator=g)), torch.nn.Parameter(torch.randn(10, generator=g))]


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_moves_exactly_the_fraction_with_the_largest_momentum(fused):
    ps = params()
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused)
    MoFO(MoFOConfig(fraction=0.25)).configure_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        for p, old in zip(ps, before):
            mask = chosen(opt.state[p]["exp_avg"], 0.25)
            assert int(mask.sum()) == round(0.25 * p.numel())
            assert torch.equal(p[~mask], old[~mask])  # the rest bit-identical (weight decay included)
            assert (p[mask] != old[mask]).all()  # every chosen entry took its Adam step


def test_fraction_one_is_plain_adamw():
    a, b = params(), params()
    opt_a, opt_b = torch.optim.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2)
    MoFO(MoFOConfig(fraction=1.0)).configure_optimizer(opt_a)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_mofo_reduces_forgetting(scenario):
    r = scenario.finetune("mofo_forget", "methods.mofo.fraction=0.1")
    plain = scenario.plain
    print(f"\nforgot: mofo {forgot(r):.3f} vs plain {forgot(plain):.3f}; "
          f"elements loss: mofo {r.after['elements']['loss']:.3f} vs plain {plain.after['elements']['loss']:.3f}")
    assert forgot(r) < 0.8 * forgot(plain)
    assert r.after["elements"]["loss"] < 0.5 * r.before["elements"]["loss"], "the new task is still learned"

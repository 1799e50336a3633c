"""A-GEM and GEM: the projected gradient never opposes the memory's; it is the plain one when they agree; GEM's is the closest such."""

import json

import pytest
import torch

from forgetless.methods.agem import AGEM, AGEMConfig, agem_project, gem_dual, gem_project
from tests.methods.conftest import forgot


def flat(ts):
    return torch.cat([t.flatten() for t in ts]).double()


def random_grads(seed, shapes=((3, 4), (5,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_agem_projection_removes_exactly_the_opposing_component():
    g, r = random_grads(0), random_grads(1)
    if float(flat(g) @ flat(r)) > 0:
        r = [-x for x in r]
    before = flat(g)
    projected, dot = agem_project(g, r)
    assert projected and dot < 0
    after, ref = flat(g), flat(r)
    assert float(after @ ref) == pytest.approx(0.0, abs=1e-6)  # >= 0, on the boundary (float32 rounding)
    torch.testing.assert_close(after, before - (before @ ref) / (ref @ ref) * ref)


def test_agem_leaves_an_agreeing_gradient_bit_identical():
    g, r = random_grads(2), random_grads(3)
    if float(flat(g) @ flat(r)) < 0:
        r = [-x for x in r]
    kept = [x.clone() for x in g]
    projected, _ = agem_project(g, r)
    assert not projected
    assert all(torch.equal(a, b) for a, b in zip(g, kept))


def test_gem_meets_every_constraint_with_the_closest_gradient():
    g = random_grads(4)
    refs = [random_grads(10 + k) for k in range(4)]
    refs[0] = [-x for x in g]  # certainly violated
    before = flat(g)
    violated, dots = gem_project(g, refs)
    assert violated >= 1
    R = torch.stack([flat(r) for r in refs])
    after = flat(g)
    assert (R @ after >= -1e-5).all()
    # KKT: after - before = R^T v with v >= 0 and v_k = 0 wherever the constraint is slack
    v = torch.linalg.lstsq(R.T, (after - before)[:, None]).solution[:, 0]
    torch.testing.assert_close(R.T @ v, after - before, atol=1e-8, rtol=1e-6)
    assert (v >= -1e-8).all()
    assert (v * (R @ after)).abs().max() < 1e-6
    # with one task GEM is A-GEM
    g1, g2, r = random_grads(5), random_grads(5), [-x * 0.5 + y for x, y in zip(random_grads(5), random_grads(6))]
    agem_project(g1, r)
    gem_project(g2, [r])
    torch.testing.assert_close(flat(g1), flat(g2))


def test_gem_dual_solves_a_hand_problem():
    gram = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    v = gem_dual(gram, torch.tensor([-4.0, 3.0]))  # min v1^2 - 4 v1 + v2^2/2 + 3 v2, v >= 0 -> (2, 0)
    torch.testing.assert_close(v, torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_a_parameter_without_gradient_is_left_alone_unless_projected():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 0.0])
    m = AGEM(AGEMConfig(memory=[], previous=None, size_examples=1))
    m.edit_gradients([p, q], {"memory": [torch.tensor([1.0, 0.0]), torch.tensor([5.0, 5.0])]})
    assert q.grad is None  # agreeing: nothing changed
    m.edit_gradients([p, q], {"memory": [torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0])]})
    assert q.grad is not None and float(flat([p.grad, q.grad]) @ torch.tensor([-1.0, 0.0, 1.0, 1.0], dtype=torch.float64)) == pytest.approx(0.0, abs=1e-6)
    assert m.steps == 2 and m.projected == 1


@pytest.mark.parametrize("mode", ["agem", "gem"])
def test_gradient_projection_reduces_forgetting(scenario, mode):
    r = scenario.finetune(f"{mode}_forget", f"methods.agem={{memory: [{{path: demo:capitals, limit: 40}}], size_examples: 40, mode: {mode}}}")
    plain = scenario.plain
    records = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    projected = [rec["gradient"][f"{mode}_projected"] for rec in records if "gradient" in rec]
    print(f"\nforgot: {mode} {forgot(r):.3f} vs plain {forgot(plain):.3f}; projected at {sum(projected):.0f} of {len(projected)} steps; "
          f"elements loss: {mode} {r.after['elements']['loss']:.3f} vs plain {plain.after['elements']['loss']:.3f}")
    assert len(projected) == 24 and 0 < sum(projected) == r.train["methods"]["agem"]["projected_steps"]
    assert forgot(r) < 0.8 * forgot(plain)
    assert r.after["elements"]["loss"] < 0.5 * r.before["elements"]["loss"], "the new task is still learned"

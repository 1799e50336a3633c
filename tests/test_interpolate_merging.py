"""forgetless interpolate with merged task vectors (--merge, --density, --weights, --seed) and per-layer alphas."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import forgetless
from forgetless.cli import main
from forgetless.config import load_config
from forgetless.merging import OUTER_GROUP, layer_groups, merge_task_vectors, scale_per_group, task_vector
from forgetless.models import load_model, load_tokenizer
from tests.conftest import FAST_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--alphas", "0,0.5,1", "--no-generation", "--max-examples", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short full fine-tunes of one tiny base on different tasks."""
    root = tmp_path_factory.mktemp("merge-runs")
    out = []
    for task in ("elements", "currencies"):
        cfg = forgetless.load_config(None, [
            *FAST_MODEL, f"output.dir={root / task}", "output.progress=false", "train.max_steps=3", "train.lr=3e-3",
            "train.micro_batch_size=8", "data.max_length=48", "eval.max_examples=4", "eval.generation=false",
            f"data.train={{path: demo:{task}, limit: 16}}", f"data.eval.{task}={{path: demo:{task}, limit: 8}}",
            "data.keep.capitals={path: demo:capitals, limit: 8}",
        ])
        forgetless.train(cfg)
        out.append(root / task)
    return out


def states(run_dirs):
    cfg = load_config(run_dirs[0] / "config.yaml")
    base = load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.train.seed).state_dict()
    return base, [AutoModelForCausalLM.from_pretrained(r / "model").state_dict() for r in run_dirs]


def test_two_runs_merged_by_ties_with_per_layer_alphas(runs, tmp_path):
    out = tmp_path / "merged"
    assert main(["interpolate", *map(str, runs), "--merge", "ties", "--density", "0.5", "--per-layer", "2", "-o", str(out), *QUICK]) == 0
    result = json.loads((out / "interpolation.json").read_text())
    assert result["roles"] == {"elements": "new", "currencies": "new", "capitals": "keep"}  # both runs' eval sets are new
    merge = result["merge"]
    assert merge["method"] == "ties" and merge["density"] == 0.5 and merge["weights"] == [1.0, 1.0] and merge["seed"] is None
    assert merge["runs"] == [str(r / "model") for r in runs]
    layers = result["per_layer"]
    assert list(layers["alphas"]) == ["blocks 0", "blocks 1", OUTER_GROUP]
    assert layers["evaluations"] == len(layers["trials"]) == 3 * 2  # (2 groups + outer) x (3 alphas - 1)
    assert layers["start_alpha"] == result["selection"]["alpha"]
    # the written model is base + alpha_g * ties(tau_1, tau_2)
    base, tuned = states(runs)
    merged = merge_task_vectors([task_vector(base, s) for s in tuned], "ties", density=0.5)
    want = scale_per_group(base, merged, layers["alphas"], layer_groups(list(base), 2))
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)


def test_one_run_dare_drops_its_own_delta_reproducibly(runs, tmp_path):
    args = ["interpolate", str(runs[0]), "--merge", "dare_linear", "--density", "0.5", "--seed", "3", *QUICK]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "interpolation.json").read_text())
    assert a["merge"]["seed"] == 3 and a["merge"]["density"] == 0.5 and "per_layer" not in a
    assert abs(a["merge"]["kept_entries"] / a["merge"]["changed_entries"] - 0.5) < 0.02
    ma, mb = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_without_new_flags_the_output_is_the_plain_sweep(runs, tmp_path):
    assert main(["interpolate", str(runs[0]), "-o", str(tmp_path / "i"), *QUICK]) == 0
    result = json.loads((tmp_path / "i" / "interpolation.json").read_text())
    assert sorted(result) == ["base", "finetuned", "metrics", "output", "points", "roles", "selection"]


@pytest.mark.parametrize("args, message", [
    (["A", "B"], "give --merge"),
    (["A", "--density", "0.5"], "--density goes with --merge"),
    (["A", "--merge", "task_arithmetic", "--density", "0.5"], "--density goes with --merge"),
    (["A", "--merge", "ties", "--density", "1.5"], "in (0, 1]"),
    (["A", "--merge", "average"], "use one of"),
    (["A", "B", "--merge", "ties", "--weights", "1"], "one per run"),
    (["A", "--merge", "ties", "--weights", "x"], "expected one number per run"),
    (["A", "--merge", "ties", "--seed", "1"], "--seed goes with"),
    (["A", "--merge", "ties", "--alphas", "0,3"], "between 0 and 2"),
    (["A", "--per-layer", "0"], "at least 1"),
    (["A", "A", "--merge", "ties"], "given twice"),
])
def test_flags_are_checked_with_one_line_errors(args, message, tmp_path, capsys):
    args = [str(tmp_path) if a in ("A", "B") else a for a in args]
    if args[:2] == [str(tmp_path)] * 2 and "given twice" not in message:
        args[1] = str(tmp_path / "other")
    assert main(["interpolate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_errors_that_need_the_runs(runs, tmp_path, capsys):
    assert main(["interpolate", *map(str, runs), "--merge", "ties"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["interpolate", str(runs[0]), "--per-layer", "3", "-o", str(tmp_path / "x"), *QUICK]) == 2
    assert "2 blocks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# forgetless merge --method: the same merge at a fixed scale, nothing scored
# ------------------------------------------------------------------------------------------------


def test_merge_writes_base_plus_scale_times_the_merged_vector(runs, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["merge", *map(str, runs), "--method", "task_arithmetic", "--weights", "1,0.5", "--scale", "0.8", "-o", str(out)]
    assert main(args) == 0
    assert "base + 0.8 * merged" in capsys.readouterr().out
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "task_arithmetic" and record["weights"] == [1.0, 0.5] and record["scale"] == 0.8
    assert record["runs"] == [str(r / "model") for r in runs] and record["density"] is None
    base, tuned = states(runs)
    merged = merge_task_vectors([task_vector(base, s) for s in tuned], "task_arithmetic", weights=[1.0, 0.5])
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in got.items():
        want = base[k] + 0.8 * merged[k] if k in merged else base[k]
        torch.testing.assert_close(v, want, rtol=0, atol=1e-6)
    assert (out / "tokenizer_config.json").is_file()
    # the same merge through interpolate's sweep at lambda 0.8 gives the same weights
    assert main(["interpolate", *map(str, runs), "--merge", "task_arithmetic", "--weights", "1,0.5", "--alphas", "0.8",
                 "--no-generation", "--max-examples", "4", "-o", str(tmp_path / "i")]) == 0
    swept = AutoModelForCausalLM.from_pretrained(tmp_path / "i").state_dict()
    assert all(torch.equal(swept[k], got[k]) for k in got)
    # an existing output is not touched without --overwrite
    before = (out / "merge.json").read_text()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "merge.json").read_text() == before
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("args, message", [
    (["A", "B"], "give --method"),
    (["A", "--scale", "0.5"], "--scale goes with --method"),
    (["A", "--density", "0.5"], "--density goes with --method"),
    (["A", "--method", "ties", "--scale", "3"], "--scale 3: give lambdas between 0 and 2"),
    (["A", "--method", "average"], "--method average: use one of"),
    (["A", "--method", "task_arithmetic", "--density", "0.5"], "--density goes with --method"),
    (["A", "B", "--method", "ties", "--weights", "1"], "one per run"),
    (["A", "--method", "ties", "--seed", "1"], "--seed goes with --method"),
])
def test_merge_flags_are_checked_with_one_line_errors(args, message, tmp_path, capsys):
    args = [str(tmp_path) if a == "A" else str(tmp_path / "other") if a == "B" else a for a in args]
    assert main(["merge", *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

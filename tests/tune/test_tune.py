"""forgetless tune: the objectives and the choice by hand, a small search, and a killed search resumed."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import forgetless
from forgetless.cli import main
from forgetless.recipes.tune import (advised_starts, budget_excess, choose, effective_scale, follow_up, objectives, pareto_front, warm_scale,
                                     strategies_for, trial_config)
from tests.conftest import FAST_MODEL

SUMMARY = {
    "sets": [{"set": "task", "role": "new"}, {"set": "caps", "role": "keep"}, {"set": "prose", "role": "keep"}],
    "data": {"task": {"higher_is_better": True}, "caps": {"higher_is_better": True}, "prose": {"higher_is_better": False}},
    "before": {"task": {"score": 0.1}, "caps": {"score": 0.8}, "prose": {"score": 20.0}},
    "after": {"task": {"score": 0.6}, "caps": {"score": 0.4}, "prose": {"score": 25.0}},
}


def test_objectives_and_the_budget_excess_by_hand():
    learned, kept = objectives(SUMMARY)
    assert learned == pytest.approx(0.6)
    assert kept == pytest.approx((0.4 / 0.8 + 20 / 25) / 2)
    assert budget_excess(SUMMARY, {"caps": 0.3}) == pytest.approx(0.1)  # dropped 0.4, may drop 0.3
    assert budget_excess(SUMMARY, {"prose": 0.3}) == pytest.approx(-0.05)  # 25% higher, may be 30%


def test_the_front_and_the_choice():
    pts = {0: (0.5, 0.5), 1: (0.6, 0.4), 2: (0.4, 0.4), 3: (0.5, 0.6)}
    assert pareto_front(pts) == [1, 3]
    trials = [{"number": n, "learned": x, "kept": y, "feasible": n != 1} for n, (x, y) in pts.items()]
    assert choose(trials, budgeted=True)["number"] == 3  # 1 is over budget; of the feasible front, 3 learned the most
    assert choose(trials, budgeted=False)["number"] == 3
    assert choose([{"number": 0, "learned": 0.1, "kept": 0.1, "feasible": False}], budgeted=True) is None


def test_auto_strategies_follow_what_the_user_has():
    cfg = forgetless.load_config(None, ["model.name_or_path=tiny", "data.train=demo:elements"])
    assert strategies_for(cfg) == ["lora", "kl", "l2sp", "full"]
    cfg = forgetless.load_config(None, ["model.name_or_path=tiny", "data.train=demo:elements", "tune.old_data=demo:capitals",
                                        "tune.general_data=demo:general"])
    assert strategies_for(cfg) == ["lora", "kl", "l2sp", "full", "mix", "replay", "ewc"]
    assert [s["strategy"] for s in advised_starts(strategies_for(cfg))] == ["lora", "kl", "mix", "replay", "ewc", "l2sp", "full"]
    t = trial_config(cfg, {"strategy": "replay", "replay.ratio": 0.3, "lr_factor": 2.0}, cfg.output.dir)
    assert list(t.methods) == ["replay"] and t.methods["replay"].ratio == 0.3 and t.train.lr == pytest.approx(cfg.train.lr * 2)
    lora = trial_config(cfg, {"strategy": "lora", "lora.r": 8, "lr_factor": 1.0}, cfg.output.dir)
    assert lora.methods["lora"].r == 8 and lora.train.lr == pytest.approx(cfg.train.lr * 10)


def test_the_controllers_mean_factor_over_the_steps():
    assert effective_scale([], 24) == 1.0  # no check: the starting strength throughout
    # 1 for steps 0-7, 4 for 8-15, 0.25 for 16-23: log mean (0 + log 4 - log 4) / 3
    assert effective_scale([(8, 4.0), (16, 0.25)], 24) == pytest.approx(1.0)
    assert effective_scale([(12, 16.0)], 24) == pytest.approx(4.0)  # half the run at x16
    assert effective_scale([(6, 2.0), (18, 8.0)], 24) == pytest.approx(math.exp((6 * 0 + 12 * math.log(2) + 6 * math.log(8)) / 24))


def test_a_follow_up_starts_where_the_controller_spent_its_run():
    params = {"strategy": "l2sp", "l2sp.weight": 0.01, "lr_factor": 1.5}
    assert follow_up(params, 8.0) == {"strategy": "l2sp", "l2sp.weight": pytest.approx(0.08), "lr_factor": 1.5}
    assert follow_up(params, 1.1) is None  # the controller had settled near the start
    assert follow_up({**params, "l2sp.weight": 20.0}, 8.0)["l2sp.weight"] == 100.0  # within the search range
    assert follow_up({**params, "l2sp.weight": 100.0}, 8.0) is None  # at its end already: nothing to try
    assert follow_up({"strategy": "replay", "replay.ratio": 0.2, "lr_factor": 1.0}, 0.5)["replay.ratio"] == pytest.approx(0.1)
    assert follow_up({"strategy": "lora", "lora.r": 8, "lr_factor": 1.0}, 8.0) is None  # no strength to warm-start


def test_a_run_over_budget_is_followed_from_its_last_factor():
    """Over the budget at the end, the controller was still raising: the follow-up takes its last
    factor (the real-model L2-SP run from 1 ended at x7.6, over; fixed 10 was inside). Inside, the
    time-weighted mean."""
    checks = [(3, 1.8), (6, 3.3), (9, 7.6)]
    assert warm_scale(checks, 12, over_budget=True) == 7.6
    assert warm_scale(checks, 12, over_budget=False) == pytest.approx(effective_scale(checks, 12))
    assert effective_scale(checks, 12) < 7.6
    assert warm_scale([], 12, over_budget=True) == 1.0


def test_follow_ups_are_enqueued_from_the_trials_files_once(tmp_path):
    """An advised start whose controller held x4 on average gets one follow-up at 4x its strength,
    once; a settled one and a trial the sampler picked get none."""
    optuna = pytest.importorskip("optuna")
    from forgetless.recipes.tune import _enqueue_follow_ups, _trial_dir, suggest

    study = optuna.create_study(directions=["maximize", "maximize"])

    def finish(params, checks, attrs, excess=-0.01):
        study.enqueue_trial(params, user_attrs={**attrs, "budget_excess": excess})
        trial = study.ask()
        assert suggest(trial, ["l2sp", "kl"], 3.0) == params  # tune's suggest() takes the enqueued values
        run_dir = _trial_dir(tmp_path, trial.number, params["strategy"])
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"train": {"steps": 24}}))
        lines = [{"step": s, "budget": {"kl": 0.1, "strength": f, "action": "raised"}} for s, f in checks]
        lines.append({"step": 24, "budget": {"strength": 100.0, "action": "end"}})  # the end's record is not a check
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        study.tell(trial, [0.5, 0.5])
        return trial.number

    first = finish({"strategy": "l2sp", "l2sp.weight": 0.01, "lr_factor": 1.0}, [(12, 16.0)], {"depth": 0})
    finish({"strategy": "kl", "kl.weight": 1.0, "lr_factor": 1.0}, [(12, 1.1)], {"depth": 0})  # settled
    finish({"strategy": "l2sp", "l2sp.weight": 0.3, "lr_factor": 1.0}, [(12, 16.0)], {})  # the sampler's: not followed
    over = finish({"strategy": "l2sp", "l2sp.weight": 0.02, "lr_factor": 1.0}, [(12, 16.0)], {"depth": 0}, excess=0.1)
    _enqueue_follow_ups(study, tmp_path)
    _enqueue_follow_ups(study, tmp_path)  # again (a resumed search): nothing more
    waiting = {t.user_attrs["follows"]: t for t in study.trials if t.state == optuna.trial.TrialState.WAITING}
    assert set(waiting) == {first, over}
    assert waiting[first].user_attrs == {"depth": 1, "follows": first}
    assert waiting[first].system_attrs["fixed_params"]["l2sp.weight"] == pytest.approx(0.04)  # inside: x4 on average
    assert waiting[over].system_attrs["fixed_params"]["l2sp.weight"] == pytest.approx(0.32)  # over: its last factor, x16


@pytest.mark.parametrize("overrides, message", [
    (["tune.strategies=[dora]"], "'dora' is not searchable"),
    (["tune.strategies=[replay]"], "replay needs tune.old_data"),
    (["tune.trials=0"], "trials must be at least 1"),
])
def test_tune_options_are_checked(overrides, message, capsys):
    assert main(["tune", "model.name_or_path=tiny", "data.train=demo:elements", *overrides]) == 2
    assert message in capsys.readouterr().err


def options(out):
    return [*FAST_MODEL, f"output.dir={out}", "data.train={path: demo:elements, limit: 16}",
            "data.eval.elements={path: demo:elements, limit: 8}", "data.keep.capitals={path: demo:capitals, limit: 8, max_drop: 0.5}",
            "train.max_steps=3", "train.micro_batch_size=8", "train.lr=1e-3", "data.max_length=48", "eval.generation=false",
            "tune.trials=3", "tune.strategies=[lora, kl, l2sp]", "output.checkpoint_every=1"]


@pytest.mark.slow
def test_a_small_search_writes_the_front_and_the_chosen_config(tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", *options(out)]) == 0
    result = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 3
    assert [t["params"]["strategy"] for t in result["trials"]] == ["lora", "kl", "l2sp"]  # the advised starts first
    assert result["limits"] == {"capitals": 0.5} and result["chosen"] in result["front"]
    for t in result["trials"]:
        summary = json.loads((tmp_path / t["run_dir"] / "summary.json").read_text())
        assert (t["learned"], t["kept"]) == pytest.approx(objectives(summary))
    best = forgetless.load_config(out / "best.yaml")  # a config the user can train
    chosen = result["trials"][result["chosen"]]
    assert list(best.methods) == [chosen["params"]["strategy"]] and best.budget.patience == 2  # the trial's own config
    assert f"chosen: trial {result['chosen']}" in capsys.readouterr().out
    html = (out / "tune.html").read_text()  # the report: the front plotted, a row per trial, the chosen config
    assert "data:image/png;base64," in html and html.count("<tr class=") == 3 and f"{result['chosen']} ★" in html
    assert "best.yaml" in html and chosen["label"] in html
    assert html.count('/report.html">') == 3 and all((tmp_path / t["run_dir"] / "report.html").is_file() for t in result["trials"])
    (out / "tune.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "tune.html").read_text() == html  # and forgetless report writes it again


def test_the_tune_report_shows_the_front_the_budget_and_unfinished_trials(tmp_path):
    from forgetless.report.tune import write_tune_report

    trials = [
        {"number": 0, "state": "COMPLETE", "params": {"strategy": "lora"}, "label": "lora r=8", "learned": 0.7, "kept": 0.9,
         "feasible": True, "budget_excess": -0.1, "steps": 40, "run_dir": str(tmp_path / "trials" / "0000-lora")},
        {"number": 1, "state": "COMPLETE", "params": {"strategy": "kl"}, "label": "kl weight=0.1", "learned": 0.9, "kept": 0.5,
         "feasible": False, "budget_excess": 0.25, "steps": 12, "run_dir": str(tmp_path / "trials" / "0001-kl")},
        {"number": 2, "state": "RUNNING", "params": {"strategy": "l2sp"}, "label": "l2sp weight=1"},
    ]
    (tmp_path / "trials" / "0000-lora").mkdir(parents=True)
    (tmp_path / "trials" / "0000-lora" / "report.html").write_text("<html></html>")
    (tmp_path / "tune.json").write_text(json.dumps({"strategies": ["lora", "kl", "l2sp"], "limits": {"capitals": 0.1}, "trials": trials,
                                                    "front": [0], "chosen": 0, "training_steps": 52}))
    (tmp_path / "best.yaml").write_text("methods:\n  lora: {r: 8}\n")
    html = write_tune_report(tmp_path).read_text()
    assert "2 finished trials of 3" in html and "capitals max_drop 0.1" in html and "52 training steps" in html
    assert '<tr class="front chosen"><td>0 ★</td>' in html and '<a href="trials/0000-lora/report.html">' in html
    assert '<td class="over">no (+0.250)</td>' in html  # over the budget, by how much
    assert "RUNNING" in html and "data:image/png;base64," in html and "lora: {r: 8}" in html


@pytest.mark.slow
def test_a_killed_search_resumes_with_its_finished_trials(tmp_path):
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "forgetless", "tune", *options(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("trials/0001-*/metrics.jsonl")):
            time.sleep(0.2)
        assert list(out.glob("trials/0000-*/summary.json")), "the first trial did not finish in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the search and the trial it runs
        proc.wait()
    first = next(out.glob("trials/0000-*/summary.json"))
    written = first.stat().st_mtime_ns
    assert main(["tune", *options(out), "--resume"]) == 0
    result = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 3
    assert first.stat().st_mtime_ns == written  # the finished trial was kept, not run again
    assert len(list(out.glob("trials/*/summary.json"))) == 3

import json
import random
from types import SimpleNamespace

import pytest
import torch

from forgetless.config import DatasetSpec, load_config
from forgetless.data.loading import load_records
from forgetless.errors import ConfigError
from forgetless.methods import REGISTRY
from forgetless.methods.base import Context
from forgetless.methods.replay import MEMORY_FILE, Candidate, Replay, algorithm_r, fill_budget, per_task
from forgetless.models.tiny import load_tiny_tokenizer
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow

CAPITALS = "{path: demo:capitals, limit: 40}"


def _fake(task: str, n: int, tokens=lambda i: 3) -> list[Candidate]:
    return [Candidate({"text": f"{task}{i}"}, "text", task, f"{task}:{i}", SimpleNamespace(input_ids=[0] * tokens(i))) for i in range(n)]


def _replay(*options, seed=0):
    cfg = load_config(None, ["data.train=x.jsonl", "data.max_length=48", *options])
    tok = load_tiny_tokenizer()
    ctx = Context.build(cfg, tok, seed=seed)
    method = Replay(cfg.methods["replay"])
    return method, method.extra_sources(ctx)[0], ctx


def _chi_square_p(counts: list[int], runs: int, k: int) -> float:
    """p-value of inclusion counts against inclusion probability k/n for every item (df = n - 1)."""
    n = len(counts)
    p = k / n
    stat = sum((c - runs * p) ** 2 / (runs * p * (1 - p)) for c in counts)
    return float(torch.special.gammaincc(torch.tensor((n - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def _inclusion_counts(sample, n=20, k=5, runs=4000, master_seed=1234) -> list[int]:
    master = random.Random(master_seed)
    counts = [0] * n
    for _ in range(runs):
        for i in sample(list(range(n)), k, random.Random(master.getrandbits(64))):
            counts[i] += 1
    return counts


def _off_by_one(items, k, rng):
    """Algorithm R with a classic bug: j drawn from 0..i-1, so late items are kept too often."""
    res = []
    for i, item in enumerate(items):
        if i < k:
            res.append(item)
        elif (j := rng.randrange(i)) < k:
            res[j] = item
    return res


def test_reservoir_is_uniform():
    def one_pass(items, k, rng):
        return algorithm_r(items, k, rng)[0]

    def two_runs(items, k, rng):  # a saved memory continued by a later run (the `seen` count carries over)
        first, seen = algorithm_r(items[:8], k, rng)
        return algorithm_r(items[8:], k, random.Random(rng.getrandbits(64)), tuple(first), seen)[0]

    assert _chi_square_p(_inclusion_counts(one_pass), 4000, 5) > 0.01
    assert _chi_square_p(_inclusion_counts(two_runs), 4000, 5) > 0.01
    assert _chi_square_p(_inclusion_counts(_off_by_one), 4000, 5) < 0.01  # the test can fail


def test_per_task_quotas():
    candidates = _fake("a", 10) + _fake("b", 3) + _fake("c", 20)
    chosen = per_task(candidates, 12, False, random.Random(0))
    per = {t: sum(c.task == t for c in chosen) for t in "abc"}
    assert per == {"b": 3, "a": 4, "c": 5}  # b cannot fill its 4: its unused slot goes to the others
    assert len({id(c) for c in chosen}) == 12
    again = per_task(_fake("a", 10) + _fake("b", 3) + _fake("c", 20), 12, False, random.Random(0))
    assert [c.where for c in again] == [c.where for c in chosen]
    other = per_task(_fake("a", 10) + _fake("b", 3) + _fake("c", 20), 12, False, random.Random(1))
    assert [c.where for c in other] != [c.where for c in chosen]


def test_token_budget_is_respected():
    candidates = _fake("a", 30, tokens=lambda i: 2 + i % 7) + _fake("b", 30, tokens=lambda i: 5)
    for chosen in (per_task(candidates, 60, True, random.Random(0)), fill_budget(candidates, 60)):
        assert 60 - 8 < sum(len(c.example.input_ids) for c in chosen) <= 60
    chosen = per_task(candidates, 60, True, random.Random(0))
    assert {c.task for c in chosen} == {"a", "b"}
    method, source, _ = _replay("methods.replay.memory=[demo:capitals, demo:currencies]", "methods.replay.size_tokens=300")
    tokens = sum(len(e.input_ids) for e in source.examples)
    assert tokens <= 300 and tokens == method.describe()["tokens"]
    assert set(method.describe()["per_task"]) == {"demo:capitals", "demo:currencies"}


def test_memory_selection_is_seeded():
    opts = (f"methods.replay.memory=[{CAPITALS}]", "methods.replay.size_examples=10")
    a = _replay(*opts, seed=0)[0].memory
    b = _replay(*opts, seed=0)[0].memory
    c = _replay(*opts, seed=1)[0].memory
    assert [x.where for x in a] == [x.where for x in b] != [x.where for x in c]


@pytest.fixture(scope="module")
def replay_run(scenario):
    return scenario.finetune(
        "replay", f"methods.replay.memory=[{CAPITALS}]", "methods.replay.size_examples=20", "methods.replay.ratio=0.25"
    )


def test_observed_ratio_and_saved_memory_reloads(replay_run, tmp_path):
    r = replay_run
    assert abs(r.data["mix"]["replay"]["observed"] - 0.25) < 0.02
    lines = [json.loads(line) for line in (r.run_dir / MEMORY_FILE).read_text().splitlines()]
    capitals = [rec.data for rec in load_records(DatasetSpec("demo:capitals", limit=40))]
    assert len(lines) == 20 == r.train["methods"]["replay"]["examples"]
    assert all({k: v for k, v in line.items() if k != "_replay"} in capitals for line in lines)  # the original records
    assert {line["_replay"]["task"] for line in lines} == {"demo:capitals"}
    assert {line["_replay"]["seen"] for line in lines} == {40}

    method, source, ctx = _replay(f"methods.replay.previous={r.run_dir}", "methods.replay.size_examples=20")
    assert [c.record for c in method.memory] == [{k: v for k, v in line.items() if k != "_replay"} for line in lines]
    assert [c.task for c in method.memory] == ["demo:capitals"] * 20 and method.seen == 40
    fresh, _ = ctx.encoder.encode_all(load_records(DatasetSpec(str(r.run_dir / MEMORY_FILE))))  # usable as a dataset
    assert [e.input_ids for e in source.examples] == [e.input_ids for e in fresh]
    # a smaller memory is a subsample of the saved one
    smaller, _, _ = _replay(f"methods.replay.previous={r.run_dir / MEMORY_FILE}", "methods.replay.size_examples=5")
    assert len(smaller.memory) == 5 and all(c.record in [m.record for m in method.memory] for c in smaller.memory)


def test_replay_reduces_forgetting(scenario, replay_run):
    plain = forgot(scenario.plain)
    print(f"forgot: plain {plain:.3f}, replay 20 capitals at 25% {forgot(replay_run):.3f}")
    assert forgot(replay_run) < 0.3 * plain
    assert replay_run.after["elements"]["loss"] < replay_run.before["elements"]["loss"] / 3


def test_kl_mix_replay_combine(scenario):
    lora = ["methods.lora.r=4"] if "lora" in REGISTRY else []
    r = scenario.finetune(
        "combined", *lora, "methods.kl.weight=0.5", "methods.mix.sources.general=demo:general", "methods.mix.weights.general=0.125",
        f"methods.replay.memory=[{CAPITALS}]", "methods.replay.size_examples=16", "methods.replay.ratio=0.25", steps=4,
    )
    assert set(r.train["methods"]) == {"kl", "mix", "replay", *(["lora"] if lora else [])}
    if lora:
        assert r.train["methods"]["kl"]["teacher"] == "adapters disabled (no copy)"
    mix = r.data["mix"]
    assert abs(mix["general"]["observed"] - 0.125) < 0.02 and abs(mix["replay"]["observed"] - 0.25) < 0.02
    records = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "terms" in rec]
    assert steps[0]["terms"]["kl"] == 0.0 and steps[-1]["terms"]["kl"] > 0
    assert (r.run_dir / MEMORY_FILE).is_file()


@pytest.mark.parametrize(
    "options, message",
    [
        (["methods.replay=true"], r"methods\.replay: nothing to remember"),
        (["methods.replay.memory=demo:capitals"], r"methods\.replay: give the memory size as size_examples or size_tokens \(one of them\)"),
        (["methods.replay.memory=demo:capitals", "methods.replay.size_examples=5", "methods.replay.size_tokens=50"], r"\(not both\)"),
        (["methods.replay.memory=demo:capitals", "methods.replay.size_examples=0"], r"methods\.replay\.size_examples must be at least 1"),
        (["methods.replay.memory=demo:capitals", "methods.replay.size_examples=5", "methods.replay.ratio=1"],
         r"methods\.replay\.ratio must be in \(0, 1\)"),
        (["methods.replay.memory=demo:capitals", "methods.replay.size_examples=5", "methods.replay.policy=fifo"],
         r"methods\.replay\.policy.*'reservoir', 'per_task'"),
    ],
)
def test_bad_replay_options(options, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["data.train=x.jsonl", *options])
    assert "\n" not in str(err.value)

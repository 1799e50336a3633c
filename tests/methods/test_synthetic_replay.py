import json

import pytest
import torch

from forgetless.config import DatasetSpec, load_config
from forgetless.data.loading import Record, load_records
from forgetless.errors import ConfigError
from forgetless.methods.base import Context
from forgetless.methods.synthetic_replay import SYNTHETIC_FILE, Sample, SyntheticReplay, SyntheticReplayConfig, filter_samples
from forgetless.models import load_model, load_tokenizer
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow

CAPITALS = "{path: demo:capitals, limit: 40}"


def _method(scenario, *options, seed=0, run_dir=None):
    cfg = load_config(None, [f"model.name_or_path={scenario.base_dir}", "data.train=x.jsonl", "data.max_length=48", *options])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok)
    ctx = Context.build(cfg, tok, run_dir=run_dir, seed=seed)
    method = SyntheticReplay(cfg.methods["synthetic_replay"])
    method.wrap_model(model, ctx)
    return method, model, ctx


def test_filters_remove_what_they_should():
    def s(text, tokens=3, finished=True, example=object(), ppl=2.0):
        return Sample({"prompt": "p", "completion": text}, "test", tokens, finished, example, ppl)

    samples = {
        "ok": s(" a"),
        "unfinished": s(" b", finished=False),
        "too_short": s(" c", tokens=1),
        "too_long": s(" d", tokens=9),
        "unusable": s(" e", example=None, ppl=None),
        "duplicate": s(" a"),
        "high_perplexity": s(" f", ppl=80.0),
        "ok2": s(" g", ppl=49.0),
    }
    cfg = SyntheticReplayConfig(min_tokens=2, max_tokens=8, max_perplexity=50.0)
    kept, stats = filter_samples(list(samples.values()), cfg)
    assert kept == [samples["ok"], samples["ok2"]]
    assert stats == dict.fromkeys(["unfinished", "too_short", "too_long", "unusable", "duplicate", "high_perplexity"], 1)
    loose = SyntheticReplayConfig(min_tokens=1, drop_unfinished=False)
    kept, stats = filter_samples(list(samples.values()), loose)
    assert len(kept) == 6 and stats["unusable"] == stats["duplicate"] == 1 and sum(stats.values()) == 2


def test_generation_is_seeded(scenario):
    free = ("methods.synthetic_replay.num_samples=8", "methods.synthetic_replay.temperature=1.0", "methods.synthetic_replay.prefix='The capital of'",
            "methods.synthetic_replay.max_new_tokens=12", "methods.synthetic_replay.drop_unfinished=false")
    rng_before = torch.random.get_rng_state()
    a = _method(scenario, *free, seed=0)[0]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    b = _method(scenario, *free, seed=0)[0]
    c = _method(scenario, *free, seed=1)[0]
    assert [x.record for x in a.kept] == [x.record for x in b.kept] != [x.record for x in c.kept]
    assert len(a.kept) >= 4
    assert all(set(x.record) == {"text"} and x.record["text"].startswith("The capital of") and x.origin == "free" for x in a.kept)

    # from the capitals' prompts, greedy continuations are the base model's answers
    greedy, _, _ = _method(scenario, f"methods.synthetic_replay.prompts={CAPITALS}", "methods.synthetic_replay.temperature=0",
                           "methods.synthetic_replay.num_samples=40")
    truth = {r.data["prompt"]: r.data["completion"] for r in load_records(DatasetSpec("demo:capitals", limit=40))}
    assert len({x.record["prompt"] for x in greedy.kept}) == len(greedy.kept) == 40
    right = sum(x.record["completion"] == truth[x.record["prompt"]] for x in greedy.kept)
    assert right >= 36, right
    assert all(x.finished and x.perplexity < 2 for x in greedy.kept)


def test_saved_file_matches_what_is_replayed(scenario, tmp_path):
    method, model, ctx = _method(scenario, f"methods.synthetic_replay.prompts={CAPITALS}", "methods.synthetic_replay.num_samples=24",
                                 "methods.synthetic_replay.max_perplexity=3", run_dir=tmp_path)
    (source,) = method.extra_sources(ctx)
    method.after_train(model, ctx)
    lines = [json.loads(line) for line in (tmp_path / SYNTHETIC_FILE).read_text().splitlines()]
    assert len(lines) == len(source.examples) == method.describe()["kept"] > 0
    for line, example in zip(lines, source.examples):
        meta = line.pop("_synthetic")
        assert set(meta) == {"origin", "new_tokens", "finished", "perplexity"} and meta["perplexity"] <= 3
        (again,), _ = ctx.encoder.encode_all([Record(line, "saved")])
        assert again.input_ids == example.input_ids and again.labels == example.labels
    removed = method.describe()["removed"]
    assert sum(removed.values()) + len(lines) == 24


def test_prompt_only_conversations_get_the_model_answer_appended(scenario, tmp_path):
    """User turns only (prompts for generation): the model's answer becomes the assistant turn."""
    prompts = tmp_path / "asks.jsonl"
    asks = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    prompts.write_text("".join(json.dumps({"messages": a}) + "\n" for a in asks))
    method, _, ctx = _method(scenario, f"methods.synthetic_replay.prompts={prompts}", "methods.synthetic_replay.num_samples=6",
                             "methods.synthetic_replay.temperature=0", "methods.synthetic_replay.drop_unfinished=false",
                             "methods.synthetic_replay.max_new_tokens=6")
    assert method.kept
    for sample in method.kept:
        *asked, answer = sample.record["messages"]
        assert asked in asks and answer["role"] == "assistant" and answer["content"].strip()
        # trained on the answer only: the prompt the model was given is the conversation's prompt
        prompt = ctx.encoder.encode_prompt(Record({"messages": asked}, "x"))
        assert sample.example.input_ids[: len(prompt)] == prompt and all(t == -100 for t in sample.example.labels[: len(prompt)])


def test_synthetic_replay_reduces_forgetting(scenario):
    r = scenario.finetune("synthetic", f"methods.synthetic_replay.prompts={CAPITALS}", "methods.synthetic_replay.temperature=0",
                          "methods.synthetic_replay.num_samples=40", "methods.synthetic_replay.ratio=0.25")
    assert abs(r.data["mix"]["synthetic_replay"]["observed"] - 0.25) < 0.02
    saved = (r.run_dir / SYNTHETIC_FILE).read_text().splitlines()
    assert len(saved) == r.train["methods"]["synthetic_replay"]["kept"] == 40
    plain = forgot(scenario.plain)
    print(f"forgot: plain {plain:.3f}, synthetic replay (greedy, 40 prompts, 25%) {forgot(r):.3f}")
    assert forgot(r) < 0.3 * plain
    assert r.after["elements"]["loss"] < r.before["elements"]["loss"] / 3


def test_everything_filtered_is_an_error(scenario):
    with pytest.raises(Exception, match=r"methods\.synthetic_replay: every generated sample was filtered out \(too_long: 4\)"):
        _method(scenario, f"methods.synthetic_replay.prompts={CAPITALS}", "methods.synthetic_replay.num_samples=4",
                "methods.synthetic_replay.temperature=0", "methods.synthetic_replay.max_tokens=1")


@pytest.mark.parametrize(
    "options, message",
    [
        (["methods.synthetic_replay.num_samples=0"], r"methods\.synthetic_replay\.num_samples must be at least 1"),
        (["methods.synthetic_replay.temperature=-1"], r"methods\.synthetic_replay\.temperature must be >= 0"),
        (["methods.synthetic_replay.top_p=0"], r"methods\.synthetic_replay\.top_p must be in \(0, 1\]"),
        (["methods.synthetic_replay.min_tokens=5", "methods.synthetic_replay.max_tokens=2"], r"max_tokens \(2\) is below min_tokens \(5\)"),
        (["methods.synthetic_replay.max_perplexity=0.5"], r"methods\.synthetic_replay\.max_perplexity must be at least 1"),
        (["methods.synthetic_replay.ratio=0"], r"methods\.synthetic_replay\.ratio must be in \(0, 1\)"),
        (["methods.synthetic_replay.prompts={path: demo:capitals, limit: -1}"], r"methods\.synthetic_replay\.prompts\.limit"),
    ],
)
def test_bad_synthetic_replay_options(options, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["data.train=x.jsonl", *options])
    assert "\n" not in str(err.value)

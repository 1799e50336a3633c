import pytest

from forgetless.config import DatasetSpec, load_config
from forgetless.data.batching import MixedBatches, Source
from forgetless.errors import ConfigError
from forgetless.methods.base import Context
from forgetless.methods.mix import Mix, temperature_shares
from forgetless.models.tiny import load_tiny_tokenizer
from tests.methods.conftest import forgot

pytestmark = pytest.mark.slow

CAPITALS = "{path: demo:capitals, limit: 40}"


def _sources(*options, seed=0):
    cfg = load_config(None, ["data.train=x.jsonl", "data.max_length=64", *options])
    tok = load_tiny_tokenizer()
    ctx = Context.build(cfg, tok, seed=seed)
    task = Source("task", ctx.load_dataset(DatasetSpec("demo:elements", limit=30)), 1.0)
    extra = Mix(cfg.methods["mix"]).extra_sources(ctx)
    task.weight = 1 - sum(s.weight for s in extra)
    return [task, *extra]


def _observed(batches: MixedBatches, steps: int) -> list[float]:
    counts = [0] * len(batches.sources)
    for step in range(steps):
        for j, _ in batches.batch(step):
            counts[j] += 1
    return [c / sum(counts) for c in counts]


def test_temperature_shares():
    sizes = {"big": 100, "small": 25}
    assert temperature_shares(sizes, 0.2, 1.0) == pytest.approx({"big": 0.16, "small": 0.04})
    assert temperature_shares(sizes, 0.2, 2.0) == pytest.approx({"big": 0.2 * 10 / 15, "small": 0.2 * 5 / 15})
    assert temperature_shares(sizes, 0.2, 1e6) == pytest.approx({"big": 0.1, "small": 0.1}, abs=1e-5)
    assert temperature_shares(sizes, 0.2, 0.5)["big"] == pytest.approx(0.2 * 100**2 / (100**2 + 25**2))


def test_observed_shares_over_an_epoch_and_determinism():
    sources = _sources(
        "methods.mix.sources={general: demo:general, capitals: " + CAPITALS + "}",
        "methods.mix.ratio=0.3",
        "methods.mix.temperature=2",
    )
    n = {s.name: len(s.examples) for s in sources}
    expected = temperature_shares({"general": n["general"], "capitals": n["capitals"]}, 0.3, 2.0)
    assert [s.weight for s in sources[1:]] == pytest.approx([expected["general"], expected["capitals"]])
    batches = MixedBatches(sources, global_batch=16, seed=0)
    epoch = batches.steps_for_epochs(1)
    for got, s in zip(_observed(batches, epoch), sources):
        assert abs(got - s.weight) < 0.02, (s.name, got, s.weight)
    # the same seed gives the same batches; another seed others
    again = MixedBatches(_sources(
        "methods.mix.sources={general: demo:general, capitals: " + CAPITALS + "}", "methods.mix.ratio=0.3", "methods.mix.temperature=2",
    ), global_batch=16, seed=0)
    assert [batches.batch(s) for s in range(epoch)] == [again.batch(s) for s in range(epoch)]
    other = MixedBatches(sources, global_batch=16, seed=1)
    assert [batches.batch(s) for s in range(epoch)] != [other.batch(s) for s in range(epoch)]


def test_zero_share_source_is_left_out():
    sources = _sources("methods.mix.sources={a: demo:general, b: demo:currencies}", "methods.mix.weights={a: 0.2, b: 0.0}")
    assert [s.name for s in sources] == ["task", "a"]


def test_mixing_capitals_reduces_forgetting(scenario):
    r = scenario.finetune("mix_capitals", f"methods.mix.sources.general={CAPITALS}", "methods.mix.weights.general=0.25")
    mix = r.data["mix"]
    assert abs(mix["general"]["observed"] - 0.25) < 0.02 and abs(mix["task"]["observed"] - 0.75) < 0.02
    assert r.train["methods"]["mix"]["shares"] == {"general": 0.25}
    plain = forgot(scenario.plain)
    print(f"forgot: plain {plain:.3f}, mix 25% capitals {forgot(r):.3f}")
    assert forgot(r) < 0.2 * plain
    assert r.after["elements"]["loss"] < r.before["elements"]["loss"] / 2.5  # and it still learns the new task (5.97 -> 2.02)


@pytest.mark.parametrize(
    "options, message",
    [
        (["methods.mix.weights={general: -0.1}"], r"methods\.mix\.weights\.general is negative"),
        (["methods.mix.weights={general: 0}"], r"methods\.mix\.weights are all zero"),
        (["methods.mix.weights={general: 0.6, extra: 0.4}", "methods.mix.sources.extra=demo:currencies"], r"methods\.mix\.weights add up to 1"),
        (["methods.mix.weights={other: 0.2}"], r"methods\.mix\.weights names other"),
        (["methods.mix.weights={general: 0.1}", "methods.mix.ratio=0.1"], r"methods\.mix: give either weights .* not both"),
        ([], r"methods\.mix: give either weights .* not neither"),
        (["methods.mix.ratio=1.0"], r"methods\.mix\.ratio must be in \(0, 1\)"),
        (["methods.mix.ratio=0.2", "methods.mix.temperature=0"], r"methods\.mix\.temperature must be positive"),
        (["methods.mix.sources.task=demo:general", "methods.mix.ratio=0.2"], r"methods\.mix\.sources\.task: the name 'task' is taken"),
    ],
)
def test_bad_mix_options(options, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["data.train=x.jsonl", "methods.mix.sources.general=demo:general", *options])
    assert "\n" not in str(err.value)


def test_mix_without_sources():
    with pytest.raises(ConfigError, match=r"methods\.mix\.sources is empty"):
        load_config(None, ["data.train=x.jsonl", "methods.mix=true"])

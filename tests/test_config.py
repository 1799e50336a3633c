from pathlib import Path

import pytest
import yaml

from forgetless.config import RunConfig, load_config, reference_markdown, save_config
from forgetless.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_need_training_data():
    with pytest.raises(ConfigError, match="data.train is missing"):
        load_config(None, [])


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "data:\n  train: train.jsonl\n  keep:\n    old: old.jsonl\ntrain:\n  lr: 1e-4\n  epochs: 2\n")
    cfg = load_config(p, ["train.epochs=3", "output.dir=somewhere"])
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; the schema makes it a float
    assert cfg.train.epochs == 3.0
    # paths in a YAML file are relative to the file; the override path stays as given
    assert cfg.data.train[0].path == str(tmp_path / "train.jsonl")
    assert cfg.data.keep["old"].path == str(tmp_path / "old.jsonl")
    assert cfg.output.dir == "somewhere"


def test_dataset_spec_forms(tmp_path):
    p = write(tmp_path, "data:\n  train:\n    - a.jsonl\n    - {path: org/name, split: validation, limit: 5}\n")
    cfg = load_config(p)
    assert [s.path for s in cfg.data.train] == [str(tmp_path / "a.jsonl"), "org/name"]
    assert cfg.data.train[1].split == "validation" and cfg.data.train[1].limit == 5


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "data:\n  train: x.jsonl\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:4" in msg and "train.lrr" in msg and "did you mean 'lr'" in msg


def test_wrong_type_names_the_field(tmp_path):
    p = write(tmp_path, "data:\n  train: x.jsonl\ntrain:\n  micro_batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: train.micro_batch_size: expected an integer"):
        load_config(p)


def test_choice_and_override_errors():
    with pytest.raises(ConfigError, match="train.scheduler: must be one of"):
        load_config(None, ["data.train=x.jsonl", "train.scheduler=sawtooth"])
    with pytest.raises(ConfigError, match="unknown key 'epoch'.*did you mean 'epochs'"):
        load_config(None, ["data.train=x.jsonl", "train.epoch=2"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.train=x.jsonl", "train.lr"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size must be at least 1"),
        ("train.lr=-1", "train.lr must be >= 0"),
        ("train.warmup_ratio=1.5", "warmup_ratio"),
        ("data.max_length=1", "data.max_length"),
        ("model.tiny.num_heads=3", "multiple of num_heads"),
        ("eval.batch_size=0", "eval.batch_size"),
    ],
)
def test_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=x.jsonl", override])


def test_invalid_yaml_reports_line(tmp_path):
    p = write(tmp_path, "data:\n  train: [a.jsonl\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.train=demo:capitals", "data.eval.x=demo:elements", "train.lr=3e-4"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_reference_doc_is_current():
    doc = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert doc == reference_markdown(), "docs/CONFIG.md is stale: run `forgetless config --markdown > docs/CONFIG.md`"


def test_every_example_config_validates():
    from forgetless.methods import REGISTRY

    examples = sorted((ROOT / "configs" / "examples").glob("*.yaml"))
    assert examples, "no example configs"
    covered = set()
    for path in examples:
        cfg = load_config(path)
        covered |= set(cfg.methods)
        assert yaml.safe_load(path.read_text())  # not empty
        for spec in cfg.data.train:
            assert spec.path.startswith("demo:") or Path(spec.path).exists(), f"{path}: {spec.path} missing"
    assert covered == set(REGISTRY), f"methods without an example config: {sorted(set(REGISTRY) - covered)}"


def test_an_unquoted_no_is_the_word_a_choice_spells(tmp_path):
    """YAML 1.1 reads `no` as false: train.mixed_precision=no must still mean 'no', in a file and on the command line."""
    cfg = load_config(None, ["model.name_or_path=tiny", "data.train=demo:elements", "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: tiny}\ndata: {train: demo:elements}\ntrain: {mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"

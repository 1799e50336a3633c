"""lm-evaluation-harness on the in-memory model, with a local task YAML and local data (offline)."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'forgetless[harness]')")

import forgetless  # noqa: E402
from forgetless.config import DataConfig, DatasetSpec, TinyModelConfig  # noqa: E402
from forgetless.data.formats import Encoder  # noqa: E402
from forgetless.data.loading import load_records  # noqa: E402
from forgetless.errors import UserError  # noqa: E402
from forgetless.eval.choice import score_choices  # noqa: E402
from forgetless.eval.harness import HarnessTasks  # noqa: E402
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer  # noqa: E402
from tests.conftest import FAST_MODEL, write_jsonl  # noqa: E402

pytestmark = pytest.mark.slow

CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Warsaw", "Athens"]
COUNTRIES = ["France", "Italy", "Germany", "Spain", "Portugal", "Austria", "Poland", "Greece"]
TASK_YAML = """\
task: capitals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    higher_is_better: true
  - metric: acc_norm
    higher_is_better: true
"""


@pytest.fixture
def task(tmp_path):
    """The same questions as forgetless multiple-choice records and as an lm-eval task over that file."""
    records = []
    for i, (country, city) in enumerate(zip(COUNTRIES, CITIES)):
        choices = [CITIES[(i + k) % len(CITIES)] for k in (3, 0, 5, 1)]
        records.append({"question": f"What is the capital of {country}?", "choices": choices, "answer": choices.index(city)})
    data = write_jsonl(tmp_path / "capitals_mc.jsonl", records)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals_mc.yaml").write_text(TASK_YAML.format(data=data))
    return data, tmp_path / "tasks"


def test_choice_log_likelihoods_equal_lm_evals(task):
    """Our prompt/choice join and tokenization give lm-eval's own numbers, choice by choice."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    data, include = task
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok, seed=3)
    examples, _ = Encoder(tok, DataConfig()).encode_all(load_records(DatasetSpec(path=str(data))))
    ours = score_choices(model, examples, pad_id=tok.pad_token_id, batch_size=5, device=torch.device("cpu"))
    tasks = HarnessTasks(["capitals_mc"], include_path=str(include), limit=None, num_fewshot=None, batch_size=4, metric=None)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["capitals_mc"],
                                  task_manager=tasks.manager, bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["capitals_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(examples) == 8
    for s, mine in zip(samples, ours):
        assert [c.loglik for c in mine] == pytest.approx([r[0][0] for r in s["resps"]], abs=1e-4)
    assert tasks.metrics == {"capitals_mc": "acc"} and tasks.higher_is_better == {"capitals_mc": True}


def test_harness_tasks_are_scored_before_and_after_like_keep_sets(tmp_path, task):
    data, include = task
    cfg = forgetless.load_config(None, [
        *FAST_MODEL, f"data.train={data}", f"data.keep.mc={data}", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "train.max_steps=3", "train.lr=1e-2", "train.micro_batch_size=4", "eval.generation=false", "data.max_length=48",
        "eval.harness.tasks=[capitals_mc]", f"eval.harness.include_path={include}", "eval.harness.batch_size=3",
    ])
    result = forgetless.train(cfg)
    assert result.roles["harness/capitals_mc"] == "keep"
    for when in (result.before, result.after):
        h = when["harness/capitals_mc"]
        assert h["examples"] == 8 and h["score"] == h["acc"]
        # the same records through forgetless' own multiple-choice scoring
        assert (h["acc"], h["acc_norm"]) == (when["mc"]["mc_accuracy"], when["mc"]["mc_accuracy_norm"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("harness/capitals_mc" in r.get("eval", {}) for r in logged) == 2


def test_scoring_leaves_random_states_alone_and_bad_names_fail_early(task, monkeypatch):
    data, include = task
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), tok, seed=3)
    tasks = HarnessTasks(["capitals_mc"], include_path=str(include), limit=3, num_fewshot=0, batch_size=4, metric="acc_norm")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    scores = tasks.evaluate(model.train(), tok)["harness/capitals_mc"]
    assert torch.equal(torch.rand(3), expected) and model.training  # lm-eval's seeding undone, the train mode restored
    assert scores["examples"] == 3 and scores["score"] == scores["acc_norm"]
    import functools

    import lm_eval.tasks

    # an unknown name makes lm-eval index its ~15,000 built-in tasks (half a minute); not here
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    with pytest.raises(UserError, match="eval.harness.tasks: unknown lm-eval task 'capitals_typo'"):
        HarnessTasks(["capitals_typo"], include_path=str(include), limit=None, num_fewshot=None, batch_size=4, metric=None)

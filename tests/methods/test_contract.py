"""The contract every registered method keeps, checked on every one of them.

A new method is one file plus its example YAML (``configs/examples/<name>.yaml``): this file is
parametrised over ``REGISTRY``, so the method gets every check below for free, and fails the
first one if its example is missing. Each check runs the example's ``methods`` section on a
shrunk run (the fast tiny model, 3 steps, small evaluations, the example's own shipped data):

1. config      the example loads and validates, and enables exactly its own method;
2. state       ``state_dict()`` holds only tensors and JSON values, and survives the checkpoint's
               files and ``load_state_dict`` exactly: after the setup hooks of a fresh run, and
               from a real checkpoint taken after training steps, loaded the way a resumed run does;
3. resume      a run killed after step 2 (FORGETLESS_FAULT, as tests/resume do) and resumed ends
               bit-identical to an uninterrupted run: weights, metrics.jsonl, summary, and the
               files the method wrote;
4. chaining    ``task_run_config`` for tasks 1 and 2 of a 2-task sequence (task 2 after a real run of
               the method) gives configs that validate; the method's ``next_task`` keeps it or leaves
               it out with a note naming it; KEEPS_BASE keeps the base model, otherwise the task
               starts from the previous run; task 2 then trains;
5. summary     summary.json's ``train.methods`` has the method's ``describe()`` entry, and
               describe() is plain JSON (json.dumps with no default= to hide a tensor);
6. base        STARTS_AT_BASE: after wrap_model and after before_train the wrapped model gives the
               base model's logits, and every loss term of the method is zero before the first
               update (computed directly, and in the first metrics.jsonl record); in task 2 of a
               sequence it starts from the model the previous run saved;
7. prefix      every parameter the method adds carries its prefix (``spec.owns``); FREEZES_BASE:
               no base weight trains; the setup hooks leave no gradient behind for step 1.

Nothing here names a method: what differs between methods comes from what they declare
(``spec.has(...)``), except the few overrides in ``NEEDS`` (each says why). A short run takes
about half a second, so every check runs by default: the whole file takes about a minute on two
busy CPU cores, of which the resumes (kill + resume per method) and the task-2 runs are ~20 s.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import forgetless
from forgetless.checkpoint import latest_checkpoint, load_checkpoint, method_files
from forgetless.config import config_from_dict, to_dict
from forgetless.data.batching import collate
from forgetless.loss import forward as lm_forward
from forgetless.methods import Context, build_methods
from forgetless.recipes.continual import task_run_config
from forgetless.registry import FREEZES_BASE, KEEPS_BASE, REGISTRY, STARTS_AT_BASE
from tests.conftest import FAST_MODEL
from tests.resume.conftest import assert_same_run, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
METHODS = sorted(REGISTRY)
STEPS = 3
KILL_AT = "step:2"  # after step 2's record, before its checkpoint: the resumed run starts from step-000001

# Options a method needs to run on the shrunk run at all, and why. Keep this list short.
NEEDS = {
    # The untrained tiny model never emits a stop token within max_new_tokens, so the example's
    # default filter (drop_unfinished) would drop every generated sample and the run would refuse to start.
    "synthetic_replay": ["methods.synthetic_replay.drop_unfinished=false"],
}

# A STARTS_AT_BASE method's terms measure the distance from the starting model (anchors, a teacher),
# so they are zero before the first update; identical weights / distributions give 0 up to rounding.
# (A term that is not such a distance, e.g. a weight-size penalty on a fresh adapter, must be off in
# the method's example for this check.)
TERM_ATOL = 1e-6
LOGITS_ATOL = 1e-6


# ------------------------------------------------------------------------------------------------
# Configs and runs
# ------------------------------------------------------------------------------------------------


def example(name: str) -> Path:
    path = EXAMPLES / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(
            f"method {name!r} is registered but has no example config {path.relative_to(EXAMPLES.parents[1])}: "
            f"a new method is one file plus its example YAML (configs/examples/<name>.yaml, enabling only that method)"
        )
    return path


def shrunk(name: str, out: Path, *extra: str):
    """The example's config on a short run: the fast tiny model, STEPS steps, a checkpoint every step."""
    return forgetless.load_config(example(name), [
        *FAST_MODEL,
        f"output.dir={out}",
        "output.progress=false",
        "output.log_every=1",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=true",
        f"train.max_steps={STEPS}",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
        "eval.max_examples=4",
        "eval.generation=false",
        *NEEDS.get(name, ()),
        *extra,
    ])


class Runs:
    """One uninterrupted short run per method, trained on first use and shared by the checks."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, object] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            try:
                forgetless.train(shrunk(name, out))
                self.done[name] = out
            except Exception as e:  # every check of this method reports the same failure, trained once
                self.done[name] = e
        got = self.done[name]
        if isinstance(got, Exception):
            raise AssertionError(f"the short run of methods.{name} failed: {got.__class__.__name__}: {got}") from got
        return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("contract"))


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    finally:
        model.train(was)


class Setup:
    """The recipe's setup (forgetless/recipes/finetune.py ``_setup``) up to ``before_train``, on one CPU
    process and without a run directory: what the model looks like when step 1 starts."""

    def __init__(self, cfg, resume_state=None):
        from accelerate.utils import set_seed

        from forgetless.models import load_model, load_tokenizer
        from forgetless.recipes.finetune import prepare_data

        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples, _, _ = prepare_data(cfg, self.tokenizer)
        model = load_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
        self.base = copy.deepcopy(model).eval()  # the unwrapped base model, as loaded
        self.base_ids = {id(p) for p in model.parameters()}
        self.methods = build_methods(cfg.methods)
        self.ctx = Context.build(cfg, self.tokenizer, None, None, self.train_examples, cfg.train.seed, resume_state=resume_state)
        for m in self.methods:
            model = m.wrap_model(model, self.ctx)
        self.wrapped_names = [n for n, _ in model.named_parameters()]
        self.logits_after_wrap = _logits(model, self.batch())  # before before_train (check 6 looks at both)
        self.sources = [s for m in self.methods for s in m.extra_sources(self.ctx)]
        self.paired = {m.name: m.paired_data(self.ctx) for m in self.methods}
        for m in self.methods:
            m.before_train(model, self.ctx)
        if resume_state is not None:  # as the recipe does after before_train, on a resumed run
            for m in self.methods:
                m.load_state_dict(resume_state.get(m.name, {}))
        self.model = model

    def method(self, name: str):
        (m,) = [m for m in self.methods if m.name == name]
        return m

    def batch(self, examples=None) -> dict[str, torch.Tensor]:
        return collate(list(examples or self.train_examples)[:4], self.tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------
# State helpers
# ------------------------------------------------------------------------------------------------


def through_checkpoint_files(methods: list) -> dict[str, dict]:
    """Every method's state_dict() as a resumed run reads it back: tensors through safetensors, the
    rest through JSON (forgetless/checkpoint.py ``method_files`` / ``load_checkpoint``)."""
    from safetensors.torch import load, save

    tensors, plain = method_files(methods)
    loaded = load(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})) if tensors else {}
    out = {name: dict(values) for name, values in json.loads(json.dumps(plain)).items()}
    for key, t in loaded.items():
        name, _, k = key.partition("/")
        out.setdefault(name, {})[k] = t
    return out


def assert_state_values(state: dict, where: str) -> None:
    """Tensors, or JSON values that come back from JSON unchanged (checkpoint.py pickles nothing)."""
    plain = {}
    for key, value in state.items():
        assert isinstance(key, str), f"{where}: key {key!r} is not a string"
        if not torch.is_tensor(value):
            plain[key] = value
    try:
        text = json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AssertionError(f"{where}: the non-tensor part is not JSON: {e}") from None
    back = json.loads(text)
    changed = [k for k in plain if back[k] != plain[k]]
    assert not changed, f"{where}: {changed[0]!r} changes through JSON ({type(plain[changed[0]]).__name__} {plain[changed[0]]!r:.200})"


def assert_same_state(got: dict, expected: dict, where: str) -> None:
    assert sorted(got) == sorted(expected), f"{where}: keys differ: {sorted(set(got) ^ set(expected))[:5]}"
    for k in expected:
        a, b = got[k], expected[k]
        if torch.is_tensor(b):
            assert torch.is_tensor(a), f"{where}: {k} is a tensor in the saved state, {type(a).__name__} after loading"
            assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {k}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
            assert torch.equal(a.cpu(), b.cpu()), f"{where}: tensor {k} differs after load_state_dict"
        else:
            assert a == b, f"{where}: {k} differs after load_state_dict: {a!r:.200} vs {b!r:.200}"


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r and "eval" not in r]


# ------------------------------------------------------------------------------------------------
# 1. config
# ------------------------------------------------------------------------------------------------


def test_methods_are_registered():
    assert METHODS, "REGISTRY is empty: the built-in methods did not register"


@pytest.mark.parametrize("name", METHODS)
def test_example_config_loads_and_enables_only_its_method(name, tmp_path):
    spec = REGISTRY[name]
    cfg = forgetless.load_config(example(name))  # validates
    assert list(cfg.methods) == [name], f"{example(name).name} enables {list(cfg.methods)}; it must show methods.{name} alone"
    assert isinstance(cfg.methods[name], spec.config)
    small = shrunk(name, tmp_path / "run")  # the shrunk run of the other checks validates too
    if name not in NEEDS:
        assert to_dict(small.methods[name]) == to_dict(cfg.methods[name]), "the shrunk run changed the example's methods section"


# ------------------------------------------------------------------------------------------------
# 2. state round-trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_state_after_setup_round_trips(name, tmp_path):
    cfg = shrunk(name, tmp_path / "run")
    fresh = Setup(cfg)
    m = fresh.method(name)
    state = m.state_dict()
    assert isinstance(state, dict), f"{name}.state_dict() returned {type(state).__name__}"
    assert_state_values(state, f"{name}.state_dict() after the setup hooks")
    saved = through_checkpoint_files(fresh.methods)
    assert_same_state(saved.get(name, {}), state, f"{name}: the state through the checkpoint's files")

    m.load_state_dict(saved.get(name, {}))  # idempotent on the object that saved it
    assert_same_state(m.state_dict(), state, f"{name}: load_state_dict on the same object")

    resumed = Setup(cfg, resume_state=saved)  # a new run's setup hooks with ctx.restored(name), then load_state_dict
    assert_same_state(resumed.method(name).state_dict(), state, f"{name}: a resumed run's setup + load_state_dict")


@pytest.mark.parametrize("name", METHODS)
def test_state_from_a_real_checkpoint_loads_back_exactly(name, runs, tmp_path):
    run_dir = runs(name)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert ckpt.step == STEPS
    state = ckpt.methods.get(name, {})
    assert_state_values(state, f"{name}: the state in {ckpt.path.name}")
    resumed = Setup(shrunk(name, tmp_path / "run"), resume_state=ckpt.methods)
    assert_same_state(resumed.method(name).state_dict(), state, f"{name}: {ckpt.path.name} loaded by a resumed run's setup")


# ------------------------------------------------------------------------------------------------
# 3. bit-exact resume
# ------------------------------------------------------------------------------------------------


def killed(cfg, fault: str) -> int:
    """Train in a forked child that ends at ``fault`` like SIGKILL (tests/resume/conftest.py); its exit code."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            os.environ["FORGETLESS_FAULT"] = fault
            forgetless.train(cfg)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("name", METHODS)
def test_killed_and_resumed_run_is_bit_identical(name, runs, tmp_path):
    reference = runs(name)
    out = tmp_path / "run"
    assert killed(shrunk(name, out), KILL_AT) == 137, "the run was not killed at the fault point"
    assert not (out / "summary.json").exists()
    assert latest_checkpoint(out).name == "step-000001"
    forgetless.train(shrunk(name, out, "output.resume=true"))
    assert_same_run(reference, out)
    assert_same_artifacts(reference, out)


# The recipe's own files at the top of a run directory, compared by assert_same_run (or naming the
# directory / wall-clock times); every other file there is one a method wrote (ctx.save_artifact).
RECIPE_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "summary.md"}


def assert_same_artifacts(a: Path, b: Path) -> None:
    """The files methods wrote for the next task are the same (safetensors: same tensors and metadata;
    their header's key order is not fixed, so not byte for byte)."""
    from safetensors import safe_open

    names = sorted(p.name for p in a.iterdir() if p.is_file() and p.name not in RECIPE_FILES)
    assert names == sorted(p.name for p in b.iterdir() if p.is_file() and p.name not in RECIPE_FILES)
    for n in names:
        if n.endswith(".safetensors"):
            with safe_open(str(a / n), framework="pt") as fa, safe_open(str(b / n), framework="pt") as fb:
                assert fa.metadata() == fb.metadata(), f"{n}: metadata differs"
                assert sorted(fa.keys()) == sorted(fb.keys()), f"{n}: tensors differ"
                different = [k for k in fa.keys() if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
                assert not different, f"{n}: {len(different)} tensors differ, e.g. {different[0]}"
        else:
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs between the uninterrupted and the resumed run"


# ------------------------------------------------------------------------------------------------
# 4. task chaining
# ------------------------------------------------------------------------------------------------


def sequence(name: str, out: Path):
    """A 2-task sequence with the example's methods: task 1 trains on the example's data, task 2 on other shipped data."""
    d = to_dict(shrunk(name, out))
    d["tasks"] = [
        {"name": "first", "train": d["data"]["train"], "max_steps": 2},
        {"name": "second", "train": [{"path": "demo:currencies", "limit": 16}], "max_steps": 2},
    ]
    d["data"]["train"], d["data"]["eval"] = [], {}
    d["output"]["keep_checkpoints"] = False
    return config_from_dict(d)


def check_task_config(name: str, c, notes: list[str], where: str) -> None:
    c.validate()
    again = config_from_dict(to_dict(c))  # what config.yaml and an isolated strategy's child read back
    assert to_dict(again) == to_dict(c), f"{where}: the config changes through to_dict / config_from_dict"
    if name in c.methods:
        assert isinstance(c.methods[name], REGISTRY[name].config), f"{where}: next_task returned {type(c.methods[name]).__name__}"
    else:
        assert any(name in n for n in notes), f"{where}: next_task left methods.{name} out without a note naming it (notes: {notes})"


@pytest.mark.parametrize("name", METHODS)
def test_task_chaining(name, runs, tmp_path):
    spec = REGISTRY[name]
    seq = sequence(name, tmp_path / "unused")
    out = tmp_path / "seq"
    c1, notes1 = task_run_config(seq, 1, out, None)
    check_task_config(name, c1, notes1, f"{name}: task 1")
    assert c1.model.name_or_path == seq.model.name_or_path

    previous = runs(name)  # a real run of the method: the files it writes for the next task
    c2, notes2 = task_run_config(seq, 2, out, previous)
    check_task_config(name, c2, notes2, f"{name}: task 2")
    if spec.has(KEEPS_BASE):
        assert c2.model.name_or_path == seq.model.name_or_path, f"{name} declares KEEPS_BASE, but task 2 starts from {c2.model.name_or_path}"
    else:
        assert c2.model.name_or_path == str(previous), f"task 2 of {name} starts from {c2.model.name_or_path}, not the previous run"
    assert to_dict(seq.methods[name]) == to_dict(shrunk(name, tmp_path / "x").methods[name]), "next_task changed the strategy's own options"


@pytest.mark.parametrize("name", METHODS)
def test_task_two_trains_after_the_method_run(name, runs, tmp_path):
    out = tmp_path / "seq"
    c2, _ = task_run_config(sequence(name, tmp_path / "unused"), 2, out, runs(name))
    result = forgetless.train(c2)
    if name in c2.methods:
        assert name in result.train["methods"]
    assert (Path(c2.output.dir) / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------
# 5. summary entry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_summary_has_the_method_entry(name, runs, tmp_path):
    summary = json.loads((runs(name) / "summary.json").read_text(encoding="utf-8"))
    entries = summary["train"]["methods"]
    assert list(entries) == [name], f"summary.json train.methods: {list(entries)}"
    assert isinstance(entries[name], dict), f"{name}.describe() gave {type(entries[name]).__name__}, not a dict"
    described = Setup(shrunk(name, tmp_path / "run")).method(name).describe()
    assert isinstance(described, dict)
    json.dumps(described, allow_nan=False)  # JSON as it is, with no default= to hide a tensor


# ------------------------------------------------------------------------------------------------
# 6. starts at base
# ------------------------------------------------------------------------------------------------


def terms_at_step_zero(s: Setup, m) -> dict[str, float]:
    """Every term the method adds at the starting weights: batch, paired and step terms, as the recipe calls them."""
    model, batch = s.model, s.batch()
    model.train()  # as the recipe runs them: train mode, gradients enabled (no backward here)
    outputs = lm_forward(model, batch["input_ids"], batch["attention_mask"])
    out = {f"batch:{k}": float(v.detach()) for k, v in m.batch_terms(model, batch, outputs).items()}
    if s.paired[m.name] is not None:
        pbatch = s.batch(s.paired[m.name])
        poutputs = lm_forward(model, pbatch["input_ids"], pbatch["attention_mask"])
        out.update({f"paired:{k}": float(v.detach()) for k, v in m.paired_terms(model, pbatch, poutputs).items()})
    out.update({f"step:{k}": float(v.detach()) for k, v in m.step_terms(model).items()})
    return out


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY[n].has(STARTS_AT_BASE)])
def test_starts_at_base(name, runs, tmp_path):
    s = Setup(shrunk(name, tmp_path / "run"))
    base = _logits(s.base, s.batch())
    for when, wrapped in (("after wrap_model", s.logits_after_wrap), ("after before_train", _logits(s.model, s.batch()))):
        diff = float((wrapped - base).abs().max())
        assert diff <= LOGITS_ATOL, f"{name} declares STARTS_AT_BASE, but {when} its model's logits differ from the base's by {diff:.3g}"

    terms = terms_at_step_zero(s, s.method(name))
    nonzero = {k: v for k, v in terms.items() if not abs(v) <= TERM_ATOL}
    assert not nonzero, f"{name} declares STARTS_AT_BASE, but its terms are not zero before the first update: {nonzero}"

    first = step_records(runs(name))[0]
    assert first["step"] == 1
    logged = {k: v for k, v in first.get("terms", {}).items() if not abs(v) <= TERM_ATOL}
    assert not logged, f"{name}: the first metrics.jsonl record (computed at the starting weights) has non-zero terms {logged}"


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY[n].has(STARTS_AT_BASE)])
def test_task_two_starts_where_the_previous_run_ended(name, runs, tmp_path):
    """In a sequence, "the base" of task 2 is the model task 1 ended with: model.name_or_path is the previous
    run, or (KEEPS_BASE) the base model with the method's earlier state loaded by the method itself. Only the
    outputs are compared: terms may rightly be non-zero here (a penalty against earlier tasks' state)."""
    import dataclasses

    from forgetless.models import load_model

    previous = runs(name)
    c2, _ = task_run_config(sequence(name, tmp_path / "unused"), 2, tmp_path / "seq", previous)
    if name not in c2.methods:  # next_task left it out (test_task_chaining checks the note)
        return
    s = Setup(c2)
    ended = load_model(dataclasses.replace(c2.model, name_or_path=str(previous)), s.tokenizer, seed=c2.train.seed)
    diff = float((_logits(s.model, s.batch()) - _logits(ended, s.batch())).abs().max())
    assert diff <= LOGITS_ATOL, f"{name}: task 2's model at step 0 differs from the model the previous run saved by {diff:.3g}"


# ------------------------------------------------------------------------------------------------
# 7. prefix (and what the setup leaves for step 1)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_added_parameters_carry_the_prefix(name, tmp_path):
    spec = REGISTRY[name]
    s = Setup(shrunk(name, tmp_path / "run"))
    named = dict(s.model.named_parameters())
    added = [n for n, p in named.items() if id(p) not in s.base_ids]
    stray = [n for n in added if not spec.owns(n)]
    assert not stray, f"{name} added {len(stray)} parameters without its prefix {spec.prefix}, e.g. {stray[0]}"
    assert [n for n, _ in s.model.named_parameters()] == s.wrapped_names, f"{name}: parameters changed after wrap_model"
    if spec.has(FREEZES_BASE):
        training = [n for n, p in named.items() if id(p) in s.base_ids and p.requires_grad]
        assert not training, f"{name} declares FREEZES_BASE, but base weights train: {training[:3]}"
    assert any(p.requires_grad for p in named.values()), f"{name}: nothing trains"
    left = [n for n, p in named.items() if p.grad is not None]
    assert not left, f"{name}: the setup hooks left gradients on {len(left)} parameters (e.g. {left[0]}); step 1 would add to them"

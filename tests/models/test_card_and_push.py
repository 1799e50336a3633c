"""Hand-off: every run's model/ carries a model card with its forgetting scores; push uploads it (offline: a fake hub)."""

import json

import pytest
import yaml

import forgetless
from forgetless.cli import main
from forgetless.errors import UserError
from forgetless.models.card import serving_notes
from forgetless.models.hub import push_run
from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow


def metadata(card: str) -> dict:
    _, head, _ = card.split("---\n", 2)
    return yaml.safe_load(head)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    train = tmp / "pc.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Q{i}: {i}+{i}=", "completion": f" {2 * i}"}) + "\n" for i in range(16)))
    keep = tmp / "keep.jsonl"
    keep.write_text("".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) + "\n" for w in ("red", "blue", "green")))
    cfg = forgetless.load_config(None, fast_overrides(tmp / "run", train, f"data.keep.colours={keep}", "methods.lora.r=4",
                                                     "train.max_steps=2"))
    forgetless.train(cfg)
    return tmp / "run"


def test_every_run_has_a_model_card_with_its_scores(lora_run):
    card = (lora_run / "model" / "README.md").read_text()
    meta = metadata(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"forgetless", "lora"} <= set(meta["tags"]) and "base_model" not in meta  # 'tiny' is on no hub
    summary = json.loads((lora_run / "summary.json").read_text())
    for name, role in (("task", "learn"), ("colours", "keep")):
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} | {role} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(summary["before"][name]["score"], abs=1e-4)
        assert float(cells[4]) == pytest.approx(summary["after"][name]["score"], abs=1e-4)
    assert str(lora_run.parent) not in card  # no path of this machine
    # the snippet loads: the tiny base is saved beside the adapter, in base_model/
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert 'from_pretrained(f"{path}/base_model")' in card
    path = str(lora_run / "model")
    base = AutoModelForCausalLM.from_pretrained(f"{path}/base_model")
    assert isinstance(PeftModel.from_pretrained(base, path), PeftModel)


def test_the_card_names_a_hub_base_and_hub_datasets():
    from forgetless.models.card import model_card

    cfg = forgetless.load_config(None, ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "data.train=trl-lib/Capybara",
                                        "output.dir=/somewhere/my-run"])
    card = model_card(cfg, {}, {}, {}, {"methods": {"ewc": {}}}, {}, peft=False, adapter=False, notes=[])
    meta = metadata(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["datasets"] == ["trl-lib/Capybara"]
    assert meta["library_name"] == "transformers" and "ewc" in meta["tags"] and card.count("# my-run") == 1


def test_serving_notes_name_what_vllm_cannot_serve():
    from peft import LoraConfig, get_peft_model

    from forgetless.config import ModelConfig, TinyModelConfig
    from forgetless.methods.bottleneck import insert_adapters
    from forgetless.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1))
    tok = load_tokenizer(cfg)
    plain = get_peft_model(load_model(cfg, tok), LoraConfig(r=2, target_modules=["q_proj"]))
    assert serving_notes(plain) == []
    dora = get_peft_model(load_model(cfg, tok), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"]))
    notes = serving_notes(dora)
    assert any(n.startswith("DoRA") for n in notes) and any("modules_to_save (lm_head)" in n for n in notes)
    model = load_model(cfg, tok)
    insert_adapters(model, ["model.layers.0.mlp"], 32, 4, "relu")
    assert any("bottleneck adapters" in n and "trust_remote_code" in n for n in serving_notes(model))


class FakeHub:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail:
            raise ConnectionError("no network")
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))


def test_push_uploads_the_model_card_and_scores_in_one_commit(lora_run):
    hub = FakeHub()
    assert push_run(lora_run, "me/tiny-lora", private=True, api=hub) == "https://huggingface.co/me/tiny-lora"
    (_, repo, kw), (_, _, paths) = hub.calls
    assert repo == "me/tiny-lora" and kw["private"] is True and kw["exist_ok"] is True
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "forgetless/summary.json", "forgetless/config.yaml"} <= set(paths)
    assert not any("checkpoint" in p for p in paths)


def test_push_failures_are_one_line_and_leave_the_run(lora_run, tmp_path):
    with pytest.raises(UserError, match=r"push to me/x failed \(no network\); the run is intact in .*forgetless push"):
        push_run(lora_run, "me/x", api=FakeHub(fail=True))
    with pytest.raises(UserError, match=r"'not a repo!' is not a hub repo id"):
        push_run(lora_run, "not a repo!", api=FakeHub())
    assert main(["push", str(tmp_path), "me/x"]) == 2  # not a run


def test_output_push_to_hub_pushes_the_finished_run(tmp_path, pc_file, monkeypatch):
    import forgetless.models.hub as hub

    pushed = []
    monkeypatch.setattr(hub, "push_run", lambda run_dir, repo, private=False: pushed.append((run_dir, repo, private)) or "url")
    cfg = forgetless.load_config(None, fast_overrides(tmp_path / "run", pc_file, "train.max_steps=1", "output.push_to_hub=me/run",
                                                     "output.hub_private=true"))
    forgetless.train(cfg)
    assert pushed == [(tmp_path / "run", "me/run", True)]
    with pytest.raises(Exception, match="push_to_hub needs output.save_model=true"):
        forgetless.load_config(None, fast_overrides(tmp_path / "r2", pc_file, "output.push_to_hub=me/run", "output.save_model=false"))

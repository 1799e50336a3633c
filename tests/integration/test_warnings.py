"""What the CLI shows of warnings: forgetless's and the libraries' own once, on one line; known noise never."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fast_overrides

pytestmark = pytest.mark.slow

MISTRAL = Path(__file__).parents[1] / "data" / "chat_templates" / "mistral.jinja"


def test_a_template_warning_is_shown_once_and_library_noise_not(tmp_path):
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."}]} for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"data:\n  chat_template: {MISTRAL.name}\n")  # a .jinja file, relative to the YAML
    (tmp_path / MISTRAL.name).write_text(MISTRAL.read_text())
    # LoRA: PEFT asks transformers for a deprecated attribute (a FutureWarning forgetless silences)
    args = ["train", str(yaml), *fast_overrides(tmp_path / "run", data, "methods.lora.r=4", "train.max_steps=2")]
    proc = subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "forgetless: warning" in line or "Warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("forgetless: warning: ") and "leaves the system message out" in warnings[0]
    assert "is_gradient_checkpointing" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_template_file_is_a_config_error(tmp_path, pc_file):
    proc = subprocess.run([sys.executable, "-m", "forgetless", "train", *fast_overrides(tmp_path / "run", pc_file, "data.chat_template=nope.jinja")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "data.chat_template: file nope.jinja not found" in proc.stderr

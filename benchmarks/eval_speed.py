"""Evaluation speed: forgetless scoring a set vs plain transformers doing the same work.

Both sides get the same model, the same prompt/completion examples (encoded once by forgetless)
and the same batch size, and do the same calls: one forward pass per group of full sequences
(longest first, right-padded, similar lengths: at most ``batch_size`` x the longest in padded
tokens, a group closed before a sequence shorter than half its longest) for loss and token accuracy, then greedy ``generate`` per batch of
prompts (longest first, left-padded, KV cache), at most ``max_new_tokens`` new tokens, every
sequence stopping at the end-of-text / end-of-turn token or its first line break. The plain side
uses transformers' own ``stop_strings=["\\n"]``; forgetless uses its answer-line criterion (a
line break after the answer's first character). The decoded answers of both sides are compared
(they should be the same) and the wall times of the two, alternated ``--repeats`` times after a
warm-up, are reported as the fastest of each and their ratio.

    python benchmarks/eval_speed.py --model "$(forgetless fetch smollm2)"
    python benchmarks/eval_speed.py --model PATH --examples 256 --batch-size 16 --threads 2 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model_path)
    kwargs = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    folder = str(p.parent) if kwargs else model_path
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    return model, tok


def examples(tok, sets: list[str], n: int):
    from forgetless.config import DataConfig, DatasetSpec
    from forgetless.data.encoding import encode_dataset
    from forgetless.data.formats import Encoder

    exs, _ = encode_dataset(Encoder(tok, DataConfig(max_length=1024)), [DatasetSpec(path=s) for s in sets])
    return exs[:n]


@torch.no_grad()
def plain_transformers(model, tok, exs, batch_size: int, max_new_tokens: int, stops: list[int]):
    """What a user would write with transformers alone for the same numbers."""
    pad = tok.pad_token_id
    loss_sum, targets, correct = 0.0, 0, 0
    full = sorted(exs, key=lambda e: -len(e.input_ids))
    budget = batch_size * len(full[0].input_ids)  # the same groups: similar lengths, at most batch_size x longest tokens
    groups = [[]]
    for e in full:
        if groups[-1] and (2 * len(e.input_ids) < len(groups[-1][0].input_ids) or (len(groups[-1]) + 1) * len(groups[-1][0].input_ids) > budget):
            groups.append([])
        groups[-1].append(e)
    for batch in groups:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels) - 1] = torch.tensor(e.labels[:-1])  # not the appended end-of-text
            mask[i, : len(e.input_ids)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        y = labels[:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum").item()
        keep = y != -100
        targets += int(keep.sum())
        correct += int((logits.argmax(-1)[keep] == y[keep]).sum())
    order = sorted(range(len(exs)), key=lambda i: -len(exs[i].prompt_ids))
    answers = [None] * len(exs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(exs[i].prompt_ids) for i in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            p = exs[i].prompt_ids
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad, stop_strings=["\n"], tokenizer=tok)
        for i, row in zip(batch, out[:, width:].tolist()):
            row = next((row[:k] for k, t in enumerate(row) if t in stops), row)
            answers[i] = tok.decode(row, skip_special_tokens=True).split("\n", 1)[0]
    return {"loss": loss_sum / targets, "token_accuracy": correct / targets, "target_tokens": targets}, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory or a .gguf file")
    ap.add_argument("--sets", default="demo:capitals,demo:elements,demo:currencies", help="datasets, concatenated")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from forgetless.eval import scoring

    model, tok = load(args.model)
    exs = examples(tok, args.sets.split(","), args.examples)
    stops = scoring.stop_token_ids(tok)
    limit = scoring.auto_max_new_tokens([e.reference for e in exs], tok)
    answers = {}

    def ours():
        captured = {}
        real = scoring.generate

        def spy(*a, **k):  # keep forgetless' answers to compare them with the plain ones
            captured["answers"] = real(*a, **k)
            return captured["answers"]

        scoring.generate = spy
        try:
            result = scoring.score_examples(model, exs, tok, batch_size=args.batch_size, metric="exact_match")
        finally:
            scoring.generate = real
        answers["forgetless"] = captured["answers"]
        return result

    def theirs():
        result, answers["transformers"] = plain_transformers(model, tok, exs, args.batch_size, limit, stops)
        return result

    times = {"forgetless": [], "transformers": []}
    results = {"forgetless": ours(), "transformers": theirs()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("forgetless", ours), ("transformers", theirs)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    same = sum(a == b for a, b in zip(answers["forgetless"], answers["transformers"]))
    best = {k: min(v) for k, v in times.items()}
    report = {
        "model": args.model, "examples": len(exs), "batch_size": args.batch_size, "threads": args.threads,
        "max_new_tokens": limit, "seconds": times, "fastest": best, "ratio": best["forgetless"] / best["transformers"],
        "same_answers": f"{same}/{len(exs)}", "forgetless": results["forgetless"], "transformers": results["transformers"],
    }
    print(json.dumps(report, indent=1))
    print(f"forgetless {best['forgetless']:.2f} s, transformers {best['transformers']:.2f} s, ratio {report['ratio']:.2f}x, "
          f"same answers {same}/{len(exs)}, max_new_tokens {limit}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""The loss without a logits wall: peak memory and step time of the LM loss and the KL term,
full logits (what forgetless did before, and what a plain loop does) vs the head applied at the
target rows in chunks (forgetless/loss.py).

Each configuration runs in a fresh process: the model is loaded, one warm-up forward+backward
runs, then ``--steps`` timed ones; peak memory is the process's peak resident memory above its
level after the warm-up's first forward started (CPU), or ``torch.cuda.max_memory_allocated``
above the loaded model (GPU). Same model, batch and targets on both sides; the loss values of
the two sides are printed and must agree.

    python benchmarks/lm_head.py --model "$(forgetless fetch smollm2)" --batch 8 --length 512 --steps 2 --json benchmarks/lm_head.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # name: (loss, targets): "completion" = the last quarter of each row is the completion
    "lm loss, completion-only, full logits": ("lm-full", "completion"),
    "lm loss, completion-only, chunked head": ("lm-chunked", "completion"),
    "lm loss, every token, full logits": ("lm-full", "all"),
    "lm loss, every token, chunked head": ("lm-chunked", "all"),
    "lm + kl (frozen copy), completion-only, full logits": ("kl-full", "completion"),
    "lm + kl (frozen copy), completion-only, chunked head": ("kl-chunked", "completion"),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import copy

    import torch

    from forgetless.data.formats import IGNORE
    from forgetless.loss import forward, kl_sum, kl_sum_chunked, target_positions, token_cross_entropy
    from forgetless.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kind, targets = CONFIGS[args.config]
    device = torch.device(args.device)
    from forgetless.config import ModelConfig

    cfg = ModelConfig(name_or_path=args.model)
    model = load_model(cfg, load_tokenizer(cfg)).to(device).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if kind.startswith("kl") else None
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (args.batch, args.length), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if targets == "completion":
        labels[:, : args.length * 3 // 4] = IGNORE

    def step() -> float:
        if kind.endswith("full"):
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss, _ = token_cross_entropy(logits, labels)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, attention_mask=mask).logits
                select = target_positions(labels)
                loss = loss + kl_sum(logits[:, :-1][select], t_logits[:, :-1][select], 1.0)
        else:
            out = forward(model, ids, mask)
            loss, _ = out.token_loss(labels)
            if teacher is not None:
                with torch.no_grad():
                    t_out = forward(teacher, ids, mask)
                loss = loss + kl_sum_chunked(out, t_out, target_positions(labels), 1.0)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    value = step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else _peak_rss_mb() - base
    return {"config": args.config, "loss": value, "step_s": statistics.median(times), "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder, hub id or .gguf file")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="run only these configurations")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--config", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.config:
        print(json.dumps(child(args)))
        return
    rows = []
    for name in args.only or CONFIGS:
        cmd = [sys.executable, __file__, "--config", name, "--model", args.model, "--batch", str(args.batch), "--length", str(args.length),
               "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:55s} loss {row['loss']:.5f}  step {row['step_s']:.2f} s  peak +{row['peak_mb']:.0f} MB", flush=True)
    print("\n| configuration | loss | step time | vs full logits | peak memory above the model | vs full logits |")
    print("| --- | --- | --- | --- | --- | --- |")
    by = {r["config"]: r for r in rows}
    for r in rows:
        ref = by.get(r["config"].replace("chunked head", "full logits"), r)
        print(f"| {r['config']} | {r['loss']:.4f} | {r['step_s']:.2f} s | {r['step_s'] / ref['step_s']:.2f}x | {r['peak_mb']:.0f} MB | {r['peak_mb'] / max(ref['peak_mb'], 1):.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "length": args.length, "steps": args.steps, "threads": args.threads,
                                         "device": args.device, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

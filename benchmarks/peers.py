"""forgetless side by side with what users would pick instead: a bare PyTorch loop, HF Trainer, Trainer + PEFT.

Every configuration trains the same model (same weights) on the same token ids and labels, in
the same per-step batches, for the same number of optimiser steps, with the same optimisation:
AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0), a constant learning rate without
warm-up, the gradient norm clipped to 1.0 (``--max-grad-norm``, 0 = off on every side), float32
(no mixed precision), the whole batch in one forward pass (forgetless alone may cut a step's
batch into micro-batches of similar lengths, its own batching; the script says at which steps it
does). The examples are encoded once, by forgetless's own encoder (``prepare_data``:
completion-only labels for prompt/completion data), and drawn and ordered as forgetless's batcher
draws them, so that every side sees the tensors forgetless does.

- ``bare loop``: the 20-line loop: collate, ``model(input_ids, attention_mask, labels).loss``
  (HF's own loss), ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW`` (its default
  implementation: foreach on a GPU, a per-tensor loop on a CPU), ``step``, ``zero_grad``;
- ``bare loop, fused AdamW``: the same with ``AdamW(fused=True)``, what HF Trainer picks by
  default with torch >= 2.8 (``optim="adamw_torch_fused"``): the optimiser's share of a step;
- ``forgetless full``: ``forgetless.train(cfg)``, eval before training off, no saving, no
  progress bar, a metrics.jsonl record every step (``output.log_every=1``);
- ``HF Trainer``: ``transformers.Trainer`` with its defaults except what makes the runs equal
  (batch, steps, lr, constant schedule, clipping, sequential sampling of the prepared examples,
  no saving, no reporting, a log every step, no progress bar);
- ``bare loop + PEFT``, ``forgetless lora``, ``Trainer + PEFT``: the same three on LoRA
  (r 8, alpha 16, no dropout, every linear layer but the output head), through PEFT on every side.

With ``--bf16`` the table adds forgetless's rows in lower precision, float32 weights under bf16
autocast (``train.mixed_precision=bf16``) and bf16 weights (``model.dtype=bfloat16``), each
compared with forgetless in float32 of its kind (the peers stay in float32).

The table gives each row's step time as a ratio to the bare loop and to the Trainer of its kind:
full fine-tuning rows to ``bare loop`` and ``HF Trainer``, LoRA rows to ``bare loop + PEFT`` and
``Trainer + PEFT``. It also names the optimiser each side ended up with.

Each configuration runs in a fresh process; configurations run round-robin ``--repeats`` times
and the fastest run of each is kept. Step time is the median, after ``--warmup`` steps, of the
wall time from the end of one optimiser step to the end of the next (for the first step, from its
start): everything a step costs, its data, logging and bookkeeping included. Peak memory is the
training loop's own: the process's peak resident memory during the loop above its resident
memory when the loop starts, the model loaded (on a GPU: ``torch.cuda.max_memory_allocated``
above ``memory_allocated`` at the start). tokens/s counts the real (non-padding) tokens. Each
side's loss at the first step is printed: all sides start from the same weights on the same
batch, so they must agree (to ~1e-5); the last step's losses are compared too.

    python benchmarks/peers.py --model tiny --steps 20 --warmup 4 --batch 8 --threads 1 --repeats 2 --json benchmarks/peers_tiny.json
    python benchmarks/peers.py --model "$(forgetless fetch smollm2)" --steps 10 --warmup 3 --batch 8 --threads 1 --repeats 2 --json benchmarks/peers_smollm2.json
    python benchmarks/peers.py --model "$(forgetless fetch smollm2)" --steps 10 --warmup 3 --batch 8 --threads 1 --repeats 2 \
        --only "forgetless full" "forgetless lora" "forgetless full, bf16 autocast" "forgetless full, bf16 weights" \
        "forgetless lora, bf16 autocast" --json benchmarks/peers_smollm2_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (implementation, adapter, fused AdamW)
CONFIGS: dict[str, tuple[str, str, bool]] = {
    "bare loop": ("bare", "full", False),
    "bare loop, fused AdamW": ("bare", "full", True),
    "forgetless full": ("forgetless", "full", False),
    "HF Trainer": ("trainer", "full", False),
    "bare loop + PEFT": ("bare", "lora", False),
    "forgetless lora": ("forgetless", "lora", False),
    "Trainer + PEFT": ("trainer", "lora", False),
    "forgetless full, bf16 autocast": ("forgetless", "full", False),
    "forgetless full, bf16 weights": ("forgetless", "full", False),
    "forgetless lora, bf16 autocast": ("forgetless", "lora", False),
}
# the rows --bf16 adds: forgetless alone in lower precision, (model.dtype, train.mixed_precision); the
# other rows are float32 without autocast
PRECISION = {
    "forgetless full, bf16 autocast": ("float32", "bf16"),
    "forgetless full, bf16 weights": ("bfloat16", "no"),
    "forgetless lora, bf16 autocast": ("float32", "bf16"),
}
# the references of each row's two ratios: (bare, Trainer)
REFERENCES = {"full": ("bare loop", "HF Trainer"), "lora": ("bare loop + PEFT", "Trainer + PEFT")}
TARGETS = {"forgetless full": "<= 1.05x bare, <= 1.00x Trainer", "forgetless lora": "<= 1.00x Trainer + PEFT"}
LR, SEED, LORA_R, LORA_ALPHA = 1e-4, 42, 8, 16


def overrides(args, adapter: str, out_dir: str, precision: tuple[str, str] = ("float32", "no")) -> list[str]:
    """The forgetless configuration of every side (the peers read their data and model from it too)."""
    dtype, mixed = precision
    o = [
        f"model.name_or_path={args.model}", f"model.dtype={dtype}", f"data.train={args.data}", f"data.max_length={args.max_length}",
        f"train.seed={SEED}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.grad_accum_steps=1",
        f"train.lr={LR}", "train.weight_decay=0", "train.scheduler=constant", "train.warmup_steps=0",
        f"train.max_grad_norm={args.max_grad_norm if args.max_grad_norm > 0 else 'null'}", f"train.mixed_precision='{mixed}'",
        "eval.before=false", "eval.generation=false", "eval.max_examples=1",
        f"output.dir={out_dir}", "output.progress=false", "output.log_every=1", "output.save_model=false", "output.checkpoint_every=0",
    ]
    if adapter == "lora":
        o += [f"methods.lora.r={LORA_R}", f"methods.lora.alpha={LORA_ALPHA}", "methods.lora.dropout=0", "methods.lora.target_modules=[all-linear]"]
    return o


# ------------------------------------------------------------------------------------------------
# Memory and timing
# ------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Memory:
    """Peak memory of the training loop above its start: VmHWM reset at the start (CPU), or CUDA's peak."""

    def __init__(self, device):
        self.device = device
        self.base = self.peak = 0.0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:  # "5" resets the peak resident memory (VmHWM) to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base = _status_kb("VmRSS") / 1024

    def stop(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = (_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024

    def result(self) -> dict:
        return {"peak_mb": self.peak - self.base, "peak_abs_mb": self.peak, "base_mb": self.base}


class Clock:
    """Step times: from the end of one optimiser step to the end of the next (the first: from its start)."""

    def __init__(self, device):
        self.device, self.first_start, self.ends = device, None, []

    def begin(self) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()

    def end(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        marks = [self.first_start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


# ------------------------------------------------------------------------------------------------
# The sides (child processes)
# ------------------------------------------------------------------------------------------------


def _load(args, cfg, adapter: str, device):
    """The model every side trains: forgetless's loader (same weights: tiny's seeded init, a .gguf dequantized)."""
    from accelerate.utils import set_seed

    from forgetless.models.loading import load_model, load_tokenizer

    set_seed(SEED)  # as forgetless does before loading: LoRA's A matrices then start equal too
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer, seed=SEED).to(device)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train(), tokenizer


def _describe(optimizer) -> str:
    """The optimiser's class and implementation flags (inside accelerate's wrapper, if any)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return f"{type(inner).__name__}(fused={inner.defaults.get('fused')}, foreach={inner.defaults.get('foreach')})"


def _examples(steps: list[dict]) -> list[list]:
    from forgetless.data.formats import Example

    return [[Example(ids, labels, "") for ids, labels in zip(s["input_ids"], s["labels"])] for s in steps]


def run_bare(args, cfg, adapter: str, fused: bool, steps: list[dict], device) -> dict:
    import torch

    from forgetless.data.batching import collate

    model, tokenizer = _load(args, cfg, adapter, device)
    batches, pad = _examples(steps), tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True if fused else None)
    clock, memory, losses = Clock(device), Memory(device), []
    memory.start()
    # ---- the loop a user writes ----
    for examples in batches:
        clock.begin()
        batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
        loss = model(**batch).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        clock.end()
    # --------------------------------
    memory.stop()
    return {"losses": [float(x) for x in losses], "step_times": clock.step_times(), **memory.result(),
            "trainable_params": sum(p.numel() for p in params), "optimizer": _describe(opt)}


def run_trainer(args, cfg, adapter: str, steps: list[dict], device) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from forgetless.data.batching import collate
    from forgetless.data.formats import Example

    model, tokenizer = _load(args, cfg, adapter, device)
    pad = tokenizer.pad_token_id
    flat = [{"input_ids": ids, "labels": labels} for s in steps for ids, labels in zip(s["input_ids"], s["labels"])]

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, i):
            return flat[i]

    def collator(features):
        return collate([Example(f["input_ids"], f["labels"], "") for f in features], pad)

    clock, memory, losses = Clock(device), Memory(device), []

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, **k):
            memory.start()

        def on_step_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.end()

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

        def on_train_end(self, *a, **k):
            memory.stop()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=args.max_grad_norm,
            report_to=[], save_strategy="no", logging_steps=1, use_cpu=device.type == "cpu", dataloader_num_workers=0,
            remove_unused_columns=False, train_sampling_strategy="sequential", disable_tqdm=True, seed=SEED,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=Examples(), data_collator=collator, callbacks=[Measure()])
        for cb in (PrinterCallback, ProgressCallback):  # no printing, like forgetless's output.progress=false
            trainer.remove_callback(cb)
        trainer.train()
    return {"losses": losses, "step_times": clock.step_times(), **memory.result(),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer": f"optim={getattr(targs.optim, 'value', targs.optim)}: {_describe(trainer.optimizer)}"}


def run_forgetless(args, adapter: str, steps: list[dict], device, precision: tuple[str, str] = ("float32", "no")) -> dict:
    import forgetless
    import forgetless.recipes.finetune as ft

    clock, memory = Clock(device), Memory(device)
    step, loop = ft._step, ft._train_steps
    used = []  # the optimiser forgetless built (inside accelerate's wrapper)

    def timed_step(run, i):
        clock.begin()
        o = step(run, i)
        clock.end()
        return o

    def timed_loop(run):
        memory.start()
        loop(run)
        memory.stop()
        used.append(_describe(run.optimizer))

    ft._step, ft._train_steps = timed_step, timed_loop
    with tempfile.TemporaryDirectory() as tmp:
        cfg = forgetless.load_config(None, overrides(args, adapter, f"{tmp}/run", precision))
        result = forgetless.train(cfg)
        recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    targets = [r["target_tokens"] for r in recs]
    return {"losses": [r["loss"] for r in recs], "step_times": clock.step_times(), **memory.result(),
            "trainable_params": result.train["trainable_params"], "optimizer": used[0] if used else "?",
            "batches_match": targets == [s["targets"] for s in steps],
            "own_tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[args.warmup:]) if recs[args.warmup:] else None}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import forgetless  # noqa: F401  (imports that every side pays before its loop)

    impl, adapter, fused = CONFIGS[args.config]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = json.loads(Path(args.steps_file).read_text())
    if impl == "forgetless":
        row = run_forgetless(args, adapter, steps, device, PRECISION.get(args.config, ("float32", "no")))
    else:
        cfg = forgetless.load_config(None, overrides(args, adapter, "unused"))
        row = run_bare(args, cfg, adapter, fused, steps, device) if impl == "bare" else run_trainer(args, cfg, adapter, steps, device)
    times = row["step_times"][args.warmup:] or row["step_times"]
    tokens = [s["tokens"] for s in steps][args.warmup:] or [s["tokens"] for s in steps]
    row.update(config=args.config, device=str(device), step_s=statistics.median(times),
               tokens_per_s=statistics.mean(tokens) / statistics.median(times))
    print(json.dumps(row))


# ------------------------------------------------------------------------------------------------
# The parent: the data once, the runs, the table
# ------------------------------------------------------------------------------------------------


def prepare_steps(args) -> list[dict]:
    """The examples of every step, as forgetless draws them (prepare_data, MixedBatches) and orders them (micro_batches)."""
    import forgetless
    from forgetless.data.batching import MixedBatches, Source, count_targets, micro_batches
    from forgetless.models.loading import load_tokenizer
    from forgetless.recipes.finetune import prepare_data
    from forgetless.registry import TASK_STREAM

    cfg = forgetless.load_config(None, overrides(args, "full", "unused"))
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_data(cfg, tokenizer)[0]
    stream = MixedBatches([Source(TASK_STREAM, examples, 1.0)], args.batch, SEED)
    steps = []
    for i in range(args.steps):
        exs = sorted(stream.examples(stream.batch(i)), key=lambda e: -len(e.input_ids))  # micro_batches' order
        micro = micro_batches(exs, args.batch, tokenizer.pad_token_id)
        steps.append({"input_ids": [e.input_ids for e in exs], "labels": [e.labels for e in exs],
                      "targets": sum(count_targets(b["labels"]) for b in micro), "tokens": sum(len(e.input_ids) for e in exs),
                      "padded": len(exs) * max(len(e.input_ids) for e in exs), "micro_batches": len(micro)})
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', a model folder or a .gguf file")
    ap.add_argument("--data", default="demo:capitals", help="training data (default demo:capitals: prompt/completion)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps of every side")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the median")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch = batch of every step")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping on every side (0 = none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: hide any GPU from the runs")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration (round-robin); the fastest is kept")
    ap.add_argument("--only", nargs="*", help="names of configurations to run")
    ap.add_argument("--bf16", action="store_true", help="add forgetless's bf16 rows (autocast, bf16 weights) to the float32 ones")
    ap.add_argument("--json", type=Path, help="where to write the results")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--steps-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error("--warmup must be smaller than --steps")
    if args.config:
        child(args)
        return
    names = [n for n in CONFIGS if (n in args.only if args.only else (args.bf16 or n not in PRECISION))]
    if args.only and len(names) != len(args.only):
        ap.error(f"--only: unknown configuration(s) {sorted(set(args.only) - set(CONFIGS))}; known: {list(CONFIGS)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        steps = prepare_steps(args)
        steps_file = Path(tmp) / "steps.json"
        steps_file.write_text(json.dumps(steps))
        split = [i + 1 for i, s in enumerate(steps) if s["micro_batches"] > 1]
        if split:
            print(f"note: forgetless groups steps {split} into several micro-batches by length (the others pad them into one)", file=sys.stderr)
        common = ["--model", args.model, "--data", args.data, "--max-length", str(args.max_length), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-grad-norm", str(args.max_grad_norm),
                  "--threads", str(args.threads), "--steps-file", str(steps_file)]
        for _ in range(args.repeats):
            for name in names:
                out = subprocess.run([sys.executable, __file__, "--config", name, *common], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{name}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(row)
                print(f"{name:24s} {row['step_s'] * 1000:8.1f} ms/step  first loss {row['losses'][0]:.6f}  "
                      f"last loss {row['losses'][-1]:.6f}  peak +{row['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    results = {n: min(r, key=lambda x: x["step_s"]) for n, r in runs.items() if r}
    tokens = statistics.mean(s["tokens"] for s in steps)
    print(markdown(results, args, tokens, steps))
    if args.json:
        import peft
        import torch
        import transformers

        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("config", "steps_file")}
        saved["model"] = _model_name(args.model)
        args.json.write_text(json.dumps({"args": saved,
                                         "versions": versions, "tokens_per_step": tokens,
                                         "micro_batches_per_step": [s["micro_batches"] for s in steps], "results": results}, indent=1) + "\n")


def _model_name(model: str) -> str:
    """A local model by its file or folder name (where it lies on this machine says nothing)."""
    return Path(model).name if Path(model).exists() else model


def markdown(results: dict, args, tokens: float, steps: list[dict]) -> str:
    any_row = next(iter(results.values()), {})
    lines = [
        f"Model {_model_name(args.model)}; data {args.data} ({tokens:.0f} real tokens per step on average, batch {args.batch}); {args.steps} steps, "
        f"median step time after {args.warmup} warm-up steps, fastest of {args.repeats} round-robin runs; {args.threads} thread(s), "
        f"{any_row.get('device', '?')}; clipping {args.max_grad_norm or 'off'} on every side.",
        "",
        "| configuration | step time | vs bare loop | vs Trainer | target | tokens/s | peak memory (training) | trainable params | first-step loss | optimiser |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(r, ref_name):
        ref = results.get(ref_name)
        return f"{r['step_s'] / ref['step_s']:.2f}x" if ref else "-"

    for name, r in results.items():
        bare, trainer = REFERENCES[CONFIGS[name][1]]
        target = TARGETS.get(name, "")
        if name in PRECISION:
            ref = f"forgetless {CONFIGS[name][1]}"
            target = f"{ratio(r, ref)} of {ref} (float32)"
        lines.append(f"| {name} | {r['step_s'] * 1000:.1f} ms | {ratio(r, bare)} | {ratio(r, trainer)} | {target} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mb']:.0f} MB | {r['trainable_params']:,} | {r['losses'][0]:.6f} | {r['optimizer']} |")
    checks = []
    for adapter in ("full", "lora"):
        rows = {n: r for n, r in results.items() if CONFIGS[n][1] == adapter and n not in PRECISION}
        if len(rows) > 1:
            first = [r["losses"][0] for r in rows.values()]
            last = [r["losses"][-1] for r in rows.values()]
            checks.append(f"{adapter}: first-step losses differ by at most {max(first) - min(first):.2e}, last-step losses by {max(last) - min(last):.2e}")
    for name, r in results.items():
        if "batches_match" in r and not r["batches_match"]:
            checks.append(f"{name}: its target tokens per step differ from the prepared batches' (not the same data!)")
    return "\n".join(lines + ([""] + checks if checks else []))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Behaviour-preservation check: fingerprint the final weights of short forgetless runs.

Runs, on CPU with one thread and the same seeds every time:

- ``demo/base``: the demo's tiny base model trained briefly on demo:capitals;
- ``demo/<strategy>``: every strategy of the demo (``forgetless demo``; the override lists are
  copied below so this script does not import the demo module) fine-tuned from that base on
  demo:elements;
- ``example/<name>``: configs/examples/<name>.yaml, shortened;
- ``compare/<strategy>/<task dir>``: a short ``compare`` of configs/examples/compare.yaml, every
  task of every strategy and baseline.

For each run: sha256 over the final weights (every ``*.safetensors`` under ``<run>/model``,
adapter directories and their ``base_model/`` included; tensors sorted by name, hashing
name, dtype, shape and raw bytes), the final training loss (summary.json ``train.final_loss``)
and the after-scores (summary.json ``after``). Only the public API is used:
``forgetless.load_config``, ``forgetless.train``, ``forgetless.run_sequence``.

Usage (run it with the code under test first on PYTHONPATH)::

    git worktree add ../base <commit>                    # the code to compare against, beside this checkout
    PYTHONPATH=../base python scripts/weights_fingerprint.py --out fp-base.json
    PYTHONPATH=. python scripts/weights_fingerprint.py --out fp-new.json --compare fp-base.json
    python scripts/weights_fingerprint.py --compare fp-base.json fp-new.json   # compare two files, run nothing
    ... --only lora            # only runs whose name contains "lora" (quick iteration)

The runs are short on purpose (about 80 s for all 45 on 2 CPU cores): the demo base trains 20
steps, each demo strategy 4, each example 3, each compare task 2 (eval: 8 records per set, no
'before' evaluation outside the compare). The test is bit-identity, not quality. Deviations from
the demo / examples, besides the shortening: the base trains 20 steps rather than 6 because with
fewer its greedy answers are empty and the demo's self-synthesized replay refuses to run; the
synthetic_replay example gets drop_unfinished=false because its random-init model never ends a
sample within 8 tokens. demo/freeze--by-importance and demo/freeze--last-block have the same
hash legitimately (with 2 blocks, the least important block is the last one); so do the first
tasks of compare's sequential, replay and ewc (replay and ewc have nothing to use before task 2).

Exit status: 0 all fine; 1 a mismatch against --compare; 2 a run failed (its error is in the JSON).
"""

from __future__ import annotations

import os

# Before torch is imported, and inherited by the child processes of `compare` (each strategy runs
# in its own process): one thread, CPU only, no network, no tokenizer thread pool.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

# --------------------------------------------------------------------------------------------
# What is run (copied from forgetless/demo/run.py at bb02a2c; keep in sync by hand, on purpose)
# --------------------------------------------------------------------------------------------

MODEL_SHAPE = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=682", "model.tiny.num_layers=2"]
BASE_TRAINING = ["train.epochs=40", "train.lr=2e-3"]
FINETUNING = ["train.epochs=20", "train.lr=1e-3"]
ADAPTER_LR = "train.lr=3e-3"
STRATEGIES: dict[str, list[str]] = {
    "full fine-tuning": [],
    "freeze (last block)": ["methods.freeze.train_last_n=1"],
    "freeze (by importance)": ["methods.freeze.by_importance=1", "methods.freeze.importance_samples=32"],
    "lora": ["methods.lora.r=8", ADAPTER_LR],
    "dora": ["methods.lora.r=8", "methods.lora.variant=dora", ADAPTER_LR],
    "bottleneck adapters": ["methods.bottleneck.size=32", ADAPTER_LR],
    "ewc": ["methods.ewc.weight=100000", "methods.ewc.samples=64"],
    "l2-sp": ["methods.l2sp.weight=1"],
    "kl distillation": ["methods.kl.weight=2"],
    "mix old data 25%": ["methods.mix.sources.capitals=demo:capitals", "methods.mix.ratio=0.25"],
    "replay (40 examples)": ["methods.replay.memory=[demo:capitals]", "methods.replay.size_examples=40", "methods.replay.ratio=0.25"],
    "self-synthesized replay": ["methods.synthetic_replay.prompts=demo:capitals", "methods.synthetic_replay.num_samples=64",
                                "methods.synthetic_replay.temperature=0", "methods.synthetic_replay.max_new_tokens=8", "methods.synthetic_replay.ratio=0.25"],
    "moe lora (4 experts)": ["methods.moe_lora.num_experts=4", "methods.moe_lora.top_k=2", ADAPTER_LR],
    "o-lora": ["methods.olora=true", ADAPTER_LR],
    "lora + replay + kl": ["methods.lora.r=8", ADAPTER_LR, "methods.replay.memory=[demo:capitals]", "methods.replay.size_examples=40",
                           "methods.replay.ratio=0.25", "methods.kl.weight=2"],
}

EXAMPLES = ["freeze", "lora", "bottleneck", "ewc", "l2sp", "kl", "mix", "replay", "synthetic_replay",
            "moe_lora", "olora", "expansion", "lora_replay_kl"]

# Per example, beyond the shortening: the example's random-init tiny model never ends a sample with a
# stop token within 8 new tokens, so synthetic_replay would drop every sample as unfinished and refuse.
EXAMPLE_EXTRA = {"synthetic_replay": ["methods.synthetic_replay.drop_unfinished=false"]}

BASE_STEPS = 20     # demo base model (fewer: its greedy answers to capitals prompts are empty, so
                    # the demo's self-synthesized replay keeps no sample and refuses to run)
DEMO_STEPS = 4      # each demo strategy
EXAMPLE_STEPS = 3   # each example config
COMPARE_STEPS = 2   # each task of the compare (the joint baseline gets the sum)
EVAL = ["eval.max_examples=8", "eval.before=false"]
QUIET = ["output.progress=false", "output.overwrite=true"]


def demo_common(out: Path, name: str) -> list[str]:
    """The demo's _common(), with small evaluation and no progress bar."""
    return [
        f"output.dir={out / name}", "output.log_every=5", "train.micro_batch_size=32", "train.warmup_ratio=0.05",
        "train.seed=0", "data.max_length=64", "eval.batch_size=64", "eval.max_new_tokens=8", *EVAL, *QUIET,
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def weights_sha256(model_dir: Path) -> tuple[str, dict, int]:
    """sha256 over every tensor of every *.safetensors under model_dir (recursively).

    A tensor is keyed by its folder relative to model_dir ('.' or e.g. 'base_model') and its name,
    not by the file's name, so re-sharding within a folder does not change the hash. Returns the
    overall hash, one hash per folder, and the number of tensors.
    """
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.rglob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{model_dir}: no *.safetensors")
    tensors: dict[str, dict[str, tuple[Path, str]]] = {}
    for f in files:
        folder = f.parent.relative_to(model_dir).as_posix() or "."
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key in tensors.setdefault(folder, {}):
                    raise RuntimeError(f"{model_dir}/{folder}: tensor {key!r} is in two files")
                tensors[folder][key] = (f, key)
    total = hashlib.sha256()
    parts = {}
    count = 0
    for folder in sorted(tensors):
        h = hashlib.sha256()
        handles: dict[Path, object] = {}
        try:
            for key in sorted(tensors[folder]):
                f, _ = tensors[folder][key]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt").__enter__()
                t = handles[f].get_tensor(key)
                head = f"{folder}/{key}|{str(t.dtype).replace('torch.', '')}|{list(t.shape)}|".encode()
                data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                for hh in (h, total):
                    hh.update(len(head).to_bytes(8, "little"))
                    hh.update(head)
                    hh.update(len(data).to_bytes(8, "little"))
                    hh.update(data)
                count += 1
        finally:
            for handle in handles.values():
                handle.__exit__(None, None, None)
        parts[folder] = h.hexdigest()
    return total.hexdigest(), parts, count


def _clean(x):
    """JSON-safe: NaN/inf as strings, so two NaNs compare equal."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def fingerprint_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    sha, parts, count = weights_sha256(run_dir / "model")
    return _clean({
        "sha256": sha,
        "final_loss": summary.get("train", {}).get("final_loss"),
        "after": summary.get("after"),
        "parts": parts,
        "tensors": count,
        "steps": summary.get("train", {}).get("steps"),
    })


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, configs: Path, only: str | None):
        self.work, self.configs, self.only = work, configs, only
        self.results: dict[str, dict] = {}
        self.times: dict[str, float] = {}

    def wanted(self, name: str) -> bool:
        return self.only is None or self.only.lower() in name.lower()

    def record(self, name: str, fn) -> None:
        """Run fn() -> run directory (or a dict of results); fingerprint; never let one failure stop the rest."""
        started = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        try:
            got = fn()
            if isinstance(got, dict):
                self.results.update(got)
            else:
                self.results[name] = fingerprint_run(Path(got))
        except Exception as e:  # noqa: BLE001 - recorded, reported, exit status 2
            traceback.print_exc()
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
        self.times[name] = time.perf_counter() - started
        print(f"=== {name}: {self.times[name]:.1f}s", flush=True)

    def demo(self) -> None:
        import forgetless

        names = {f"demo/{slug(s)}": s for s in STRATEGIES}
        todo = [n for n in names if self.wanted(n)]
        if not todo and not self.wanted("demo/base"):
            return
        out = self.work / "demo"
        base_dir = out / "base"

        def base():
            cfg = forgetless.load_config(None, [
                "model.name_or_path=tiny", *MODEL_SHAPE, *demo_common(out, "base"),
                "data.train=demo:capitals", "data.eval.capitals=demo:capitals", "data.keep.elements=demo:elements",
                *BASE_TRAINING, f"train.max_steps={BASE_STEPS}",
            ])
            return forgetless.train(cfg).run_dir

        self.record("demo/base", base)
        if "error" in self.results["demo/base"]:
            for n in todo:
                self.results[n] = {"error": "the demo base model failed"}
            return
        for n in todo:
            overrides = STRATEGIES[names[n]]

            def one(overrides=overrides, n=n):
                cfg = forgetless.load_config(None, [
                    f"model.name_or_path={base_dir / 'model'}", *demo_common(out, n.split("/", 1)[1]),
                    "data.train=demo:elements", "data.eval.elements=demo:elements", "data.keep.capitals=demo:capitals",
                    *FINETUNING, *overrides, f"train.max_steps={DEMO_STEPS}",
                ])
                return forgetless.train(cfg).run_dir

            self.record(n, one)

    def examples(self) -> None:
        import forgetless

        for ex in EXAMPLES:
            name = f"example/{ex}"
            if not self.wanted(name):
                continue
            path = self.configs / f"{ex}.yaml"
            if not path.is_file():
                self.results[name] = {"skipped": f"{path} not found"}
                continue

            def one(path=path, ex=ex):
                cfg = forgetless.load_config(str(path), [
                    f"output.dir={self.work / 'examples' / ex}", f"train.max_steps={EXAMPLE_STEPS}", *EVAL, *QUIET,
                    *EXAMPLE_EXTRA.get(ex, []),
                ])
                model = cfg.model.name_or_path
                if model != "tiny" and not Path(model).expanduser().is_dir():
                    return {f"example/{ex}": {"skipped": f"model {model!r} is not local (needs the network / hub)"}}
                return forgetless.train(cfg).run_dir

            self.record(name, one)
            if name in self.results and "error" not in self.results[name] and "skipped" not in self.results[name]:
                self.results[name]["config_sha256"] = file_sha(path)

    def compare(self) -> None:
        import forgetless

        path = self.configs / "compare.yaml"
        if not path.is_file():
            if self.wanted("compare"):
                self.results["compare"] = {"skipped": f"{path} not found"}
            return
        out = self.work / "compare"
        try:
            cfg = forgetless.load_config(str(path), [
                f"output.dir={out}", f"train.max_steps={COMPARE_STEPS}", "eval.max_examples=8", *QUIET,
            ])
        except Exception as e:  # noqa: BLE001 - recorded like a failed run
            if self.wanted("compare"):
                traceback.print_exc()
                self.results["compare"] = {"error": f"load_config: {type(e).__name__}: {e}"}
            return
        if self.only is not None:  # keep the strategies / baselines that have a run whose name matches
            def runs_of(s, joint):
                return [f"compare/{s}/joint"] if joint else [f"compare/{s}/task-{i}-{t.name}" for i, t in enumerate(cfg.tasks, 1)]

            strategies = [s for s in cfg.continual.strategies if any(map(self.wanted, runs_of(s, False)))]
            baselines = [b for b in cfg.continual.baselines if any(map(self.wanted, runs_of(b, b == "joint")))]
            if not strategies and not baselines:
                return
            if not strategies:  # compare needs a strategy: run the first one as well
                strategies = [next(iter(cfg.continual.strategies))]
            for s in list(cfg.continual.strategies):
                if s not in strategies:
                    del cfg.continual.strategies[s]
            cfg.continual.baselines = baselines

        def run():
            seq = forgetless.run_sequence(cfg, compare=True)
            found = {}
            for sname, strat in seq.results["strategies"].items():
                for rel in strat["runs"]:
                    fp = fingerprint_run(Path(seq.out) / rel)
                    fp["config_sha256"] = file_sha(path)
                    found[f"compare/{rel}"] = fp
                if not strat["runs"]:
                    found[f"compare/{sname}"] = {"error": "no runs listed in the strategy's results"}
            return found

        self.record("compare", run)


# --------------------------------------------------------------------------------------------
# Comparing two fingerprint files
# --------------------------------------------------------------------------------------------

FIELDS = ("sha256", "final_loss", "after")


def compare(a: dict, b: dict, a_name: str, b_name: str, restrict: set | None = None) -> int:
    names = sorted(set(a) | set(b)) if restrict is None else sorted(restrict)
    bad = 0
    rows = []
    for n in names:
        x, y = a.get(n), b.get(n)
        if "error" in (x or {}) or "error" in (y or {}):
            status, bad = "ERROR: " + ((x or {}).get("error") or (y or {}).get("error"))[:100], bad + 1
        elif x is None or y is None:
            status, bad = f"MISSING in {a_name if x is None else b_name}", bad + 1
        elif "skipped" in x or "skipped" in y:
            if "skipped" in x and "skipped" in y:
                status = "skipped in both: " + x["skipped"][:70]
            else:
                status, bad = "skipped in one: " + (x.get("skipped") or y.get("skipped"))[:70], bad + 1
        else:
            diff = [f for f in FIELDS if x.get(f) != y.get(f)]
            if diff:
                bad += 1
                parts = [p for p in sorted(set(x.get("parts", {})) | set(y.get("parts", {})))
                         if x.get("parts", {}).get(p) != y.get("parts", {}).get(p)]
                status = "MISMATCH: " + ", ".join(diff) + (f" (weights differ in {', '.join(parts)})" if parts else "")
                if "final_loss" in diff:
                    status += f" loss {x.get('final_loss')!r} vs {y.get('final_loss')!r}"
            else:
                status = "match" + ("" if x.get("config_sha256") == y.get("config_sha256") else " (note: the config file differs)")
        rows.append((n, status, (x or {}).get("sha256", "")[:12], (y or {}).get("sha256", "")[:12]))
    w = max([len(r[0]) for r in rows] + [4])
    la, lb = Path(a_name).name, Path(b_name).name
    wa, wb = max(len(la), 12), max(len(lb), 12)
    print(f"\n{'run':<{w}}  {la:<{wa}}  {lb:<{wb}}  status")
    for n, status, ha, hb in rows:
        print(f"{n:<{w}}  {ha:<{wa}}  {hb:<{wb}}  {status}")
    print(f"\n{len(rows) - bad}/{len(rows)} runs identical (sha256 of the weights, final loss, after-scores)"
          + ("" if not bad else f"; {bad} differ, fail or are missing"))
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the fingerprints (JSON) here")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OTHER.json: compare this run's fingerprints with it; A.json B.json: compare two files, run nothing")
    p.add_argument("--only", metavar="NAME_SUBSTRING", help="only runs whose name contains this (case-insensitive)")
    p.add_argument("--configs", help="folder of the example configs (default: configs/examples next to the imported forgetless)")
    p.add_argument("--workdir", help="where the runs go (default: a temporary folder, deleted afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    args = p.parse_args(argv)

    if args.compare and len(args.compare) > 2:
        p.error("--compare takes OTHER.json, or A.json B.json")
    if args.compare and len(args.compare) == 2:
        a, b = (json.loads(Path(f).read_text(encoding="utf-8")) for f in args.compare)
        return compare(a, b, args.compare[0], args.compare[1])
    if not args.out:
        p.error("--out is required (unless --compare is given two files)")

    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

    import forgetless

    pkg = Path(forgetless.__file__).resolve().parent
    configs = Path(args.configs).resolve() if args.configs else pkg.parent / "configs" / "examples"
    print(f"forgetless {getattr(forgetless, '__version__', '?')} from {pkg}; configs from {configs}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)

    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="weights-fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = Runner(work, configs, args.only)
    try:
        runner.demo()
        runner.examples()
        runner.compare()
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started

    results = dict(sorted(runner.results.items()))
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print("\nper-run time: " + ", ".join(f"{k} {v:.0f}s" for k, v in runner.times.items()))
    print(f"{len(results)} runs fingerprinted in {elapsed:.0f}s -> {args.out}" + (f" (runs kept in {work})" if args.workdir or args.keep else ""))
    for n, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"  {n}: {r.get('error') or 'skipped: ' + r['skipped']}")
    failed = any("error" in r for r in results.values())
    code = 0
    if args.compare:
        other = json.loads(Path(args.compare[0]).read_text(encoding="utf-8"))
        code = compare(results, other, args.out, args.compare[0], restrict=set(results) if args.only else None)
    return 2 if failed else code


if __name__ == "__main__":
    sys.exit(main())

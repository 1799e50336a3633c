#!/usr/bin/env bash
# The GPU check (issue 14): what a maintainer runs when a machine with one CUDA GPU is available.
# At most about 10 minutes; prints markdown ready to paste into BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh [SMOLLM2.gguf]      # the .gguf (forgetless fetch smollm2) for the real-model row, optional
#
# 1. bf16 step time and peak memory of each method vs plain, on a ~0.5B random-init Llama (overhead.py)
# 2. a QLoRA step (4-bit base, bitsandbytes) on the same shape, saved as a checkpoint first
# 3. plain bf16 fine-tuning of the same model with one process: alone, under FSDP2 and under ZeRO-2 / ZeRO-3 (step time)
# 4. the real-model benchmark's LoRA row, when the .gguf is given
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('##', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1

echo; echo "### 1. bf16 step time of each method on a ~0.5B random-init Llama (hidden 1536, 16 layers)"
timeout 300 $PY benchmarks/overhead.py --hidden 1536 --layers 16 --steps 12 --warmup 4 --batch 8 --max-length 256 \
  --data demo:general --old-data demo:general --json "$OUT/overhead_gpu.json" \
  --extra train.mixed_precision=bf16 model.dtype=bfloat16 \
  --only "full fine-tuning" "l2sp" "ewc" "kl (frozen copy)" "replay 25%" "lora" "lora + kl (adapters off)" "mofo 10%" "a-gem" "dft" "eaft (top 20)" \
  || echo "(overhead: failed or over its 5 minutes)"

echo; echo "### 2. QLoRA: a 4-bit base, LoRA r=16"
$PY - "$OUT" <<'PYEOF'
import sys, time, json
from pathlib import Path
import forgetless
from forgetless.config import TinyModelConfig
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer
out = Path(sys.argv[1]); base = out / "base-0.5b"
if not (base / "config.json").is_file():
    tok = load_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=1536, intermediate_size=4096, num_layers=16, num_heads=12, num_kv_heads=4), tok, seed=0)
    model.save_pretrained(base, safe_serialization=True); tok.save_pretrained(base)
for name, extra in (("bf16 lora", []), ("qlora", ["model.load_in_4bit=true"])):
    cfg = forgetless.load_config(None, [f"model.name_or_path={base}", "model.dtype=bfloat16", "data.train=demo:general",
        "train.max_steps=12", "train.micro_batch_size=8", "data.max_length=256", "train.mixed_precision=bf16", "methods.lora.r=16",
        "eval.max_examples=8", "eval.generation=false", "output.progress=false", "output.save_model=false", "output.log_every=1",
        f"output.dir={out / name.replace(' ', '-')}", "output.overwrite=true", *extra])
    import torch; torch.cuda.reset_peak_memory_stats()
    r = forgetless.train(cfg)
    recs = [json.loads(l) for l in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    el = [x["elapsed_s"] for x in recs if "loss" in x]
    step = sorted(b - a for a, b in zip(el[4:], el[5:]))[len(el[5:]) // 2]
    print(f"| {name} | {step * 1000:.0f} ms/step | peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB | final loss {r.train['final_loss']:.3f} |")
PYEOF

echo; echo "### 3. one process: alone, FSDP2, ZeRO-2, ZeRO-3 (plain bf16 fine-tuning of the 0.5B model, 12 steps)"
COMMON=(model.name_or_path="$OUT/base-0.5b" model.dtype=bfloat16 data.train=demo:general train.max_steps=12 train.micro_batch_size=8
        data.max_length=256 train.mixed_precision=bf16 eval.max_examples=8 eval.generation=false output.progress=false
        output.save_model=false output.log_every=1 output.overwrite=true)
step_ms() {  # the median step time of a run directory's metrics.jsonl, after 4 warm-up steps
  $PY - "$1" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
el = [r["elapsed_s"] for r in recs]
d = sorted(b - a for a, b in zip(el[4:], el[5:]))
print(f"{d[len(d) // 2] * 1000:.0f} ms/step" if d else "no steps")
PYEOF
}
for placement in single fsdp2 zero2 zero3; do
  dir="$OUT/placement-$placement"
  case $placement in
    single) cmd=($PY -m forgetless train) ;;
    fsdp2) cmd=(accelerate launch --num_processes 1 --use_fsdp --fsdp_version 2 -m forgetless train) ;;
    zero2) cmd=($PY -m forgetless train --zero 2) ;;
    zero3) cmd=($PY -m forgetless train --zero 3) ;;
  esac
  if timeout 180 "${cmd[@]}" "${COMMON[@]}" "output.dir=$dir" > "$dir.log" 2>&1; then
    echo "| $placement | $(step_ms "$dir") |"
  else
    echo "| $placement | failed: $(tail -1 "$dir.log") |"
  fi
done

if [ -n "${1:-}" ]; then
  echo; echo "### 4. the real-model benchmark's LoRA row (SmolLM2-135M-Instruct, bf16)"
  timeout 240 $PY benchmarks/real_model.py --model "$1" --only "lora (r=16, all linear)" --out "$OUT/real_model" | tail -4
fi

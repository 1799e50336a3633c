"""What each method adds to memory for an 8B model, computed from the model's shapes (issue 14).

The model is Llama-3.1-8B's architecture (hidden 4096, 32 layers, 14,336 intermediate, 32 heads,
8 KV heads, vocabulary 128,256, untied head), built on the meta device, so nothing is allocated and
nothing is downloaded. The parameter counts are exact; the bytes follow what each method's code
keeps (read from forgetless/methods/*.py; the rule is printed beside each row):

- weights and gradients in the model's dtype (bfloat16 here), AdamW's two moments in it too
  (torch keeps them in the parameter's dtype);
- L2-SP: one anchor copy of the trainable weights (their dtype, on the device);
- EWC: an anchor copy and the weight x Fisher tensor (their dtype, on the device), and the raw
  Fisher in float32 on the CPU; while the Fisher is estimated, ``chunk_size`` per-example
  gradients at once (their dtype);
- KL: with adapters, nothing (the teacher is the adapters-off model); without, a frozen copy of
  the model (its dtype);
- MoFO: a copy of the trainable weights during each step (their dtype);
- A-GEM / GEM: one gradient copy per memory group (their dtype);
- the forgetting budget's restore: one copy of the trainable weights on the CPU (their dtype);
- mix, replay, synthetic replay, FLOW, DFT, EAFT: no per-parameter state.

    python benchmarks/memory_8b.py            # prints the markdown table (a second, no download)
"""

from __future__ import annotations

import argparse

import torch

GB = 1e9


def llama_8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def lora_params(model, r: int) -> int:
    """LoRA on every linear layer of the blocks (PEFT's all-linear leaves the head out): r x (in + out) each."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)


def table(bytes_per: int = 2, r: int = 16, chunk: int = 8, groups: int = 1) -> str:
    model = llama_8b()
    total = sum(p.numel() for p in model.parameters())
    lora = lora_params(model, r)
    rows = []
    for setting, trainable, adapters in (("full fine-tuning", total, False), (f"LoRA r={r}, all linear", lora, True)):
        base = total * bytes_per + trainable * bytes_per * 3  # weights + gradients + AdamW's two moments
        rows.append((setting, "the run itself: weights, gradients, AdamW", base, 0, "weights + 3 x trainable"))
        rows.append((setting, "l2sp", trainable * bytes_per, 0, "1 x trainable (anchor)"))
        rows.append((setting, "ewc", 2 * trainable * bytes_per, trainable * 4, "2 x trainable on the device; Fisher fp32 on the CPU"))
        rows.append((setting, f"ewc, while the Fisher is estimated (chunk_size {chunk})", chunk * trainable * bytes_per, 0,
                     "chunk_size x trainable, transient"))
        rows.append((setting, "kl", 0 if adapters else total * bytes_per, 0, "adapters off" if adapters else "frozen copy of the model"))
        rows.append((setting, "mofo", trainable * bytes_per, 0, "1 x trainable during the step"))
        rows.append((setting, f"a-gem / gem ({groups} group)", groups * trainable * bytes_per, 0, "1 x trainable per group"))
        rows.append((setting, "budget (restore on)", 0, trainable * bytes_per, "1 x trainable on the CPU"))
        rows.append((setting, "mix, replay, synthetic replay, flow, dft, eaft", 0, 0, "no per-parameter state"))
    lines = [f"Llama-3.1-8B shapes: {total:,} parameters; LoRA r={r} on every linear layer of the blocks: {lora:,} "
             f"({100 * lora / total:.2f}%); weights in bfloat16 ({bytes_per} bytes).", "",
             "| trained | what | device GB | CPU GB | rule |", "| --- | --- | --- | --- | --- |"]
    for setting, what, device, cpu, rule in rows:
        lines.append(f"| {setting} | {what} | {device / GB:,.1f} | {cpu / GB:,.1f} | {rule} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=8, help="EWC's methods.ewc.chunk_size")
    args = ap.parse_args()
    print(table(r=args.r, chunk=args.chunk_size))


if __name__ == "__main__":
    main()

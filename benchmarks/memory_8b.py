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
- mix, replay, synthetic replay, FLOW, DFT, EAFT: no per-parameter state;
- ``anchor_dtype: bfloat16`` (L2-SP, EWC) keeps anchors and weight x Fisher in 2 bytes whatever
  the weights' dtype: it matters for float32 weights (the last setting of the table);
- FSDP2 over N processes (the last column): weights, gradients, AdamW's moments, the anchors, the
  weight x Fisher tensors, EWC's raw Fisher (then kept as shards on the device, not whole on the
  CPU) and KL's frozen copy are sharded like the parameters, so each is divided by N; methods
  the support table refuses under FSDP2 say so;
- DeepSpeed ZeRO-3 over N processes (the next two columns, per process): the weights, gradients
  and the optimiser are partitioned, DeepSpeed keeping float32 master weights and AdamW moments
  for bfloat16 training (12 bytes per trainable parameter, divided by N); L2-SP's and EWC's
  anchors and weight x Fisher are partitions on the device, EWC's raw Fisher a partition on the
  CPU (forgetless.zero.Partition), each divided by N; KL's frozen copy is whole on every process
  (ZeRO-3 partitions only the engine's model).

    python benchmarks/memory_8b.py --processes 8   # prints the markdown table (a second, no download)
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


def table(bytes_per: int = 2, r: int = 16, chunk: int = 8, groups: int = 1, processes: int = 8) -> str:
    model = llama_8b()
    total = sum(p.numel() for p in model.parameters())
    lora = lora_params(model, r)
    n = processes
    # (trained, what, device bytes with one process, CPU bytes, device bytes per process under FSDP2,
    #  (device, CPU) bytes per process under ZeRO-3, rule); None: refused on that backend
    rows = []
    refused = None
    for setting, trainable, adapters in (("full fine-tuning", total, False), (f"LoRA r={r}, all linear", lora, True)):
        base = total * bytes_per + trainable * bytes_per * 3  # weights + gradients + AdamW's two moments
        zero3 = (total * bytes_per + trainable * (bytes_per + 12)) / n  # weights, gradients, fp32 master + moments
        rows.append((setting, "the run itself: weights, gradients, AdamW", base, 0, base / n, (zero3, 0),
                     "weights + 3 x trainable (ZeRO-3: + fp32 master and moments, 12 bytes per trainable)"))
        rows.append((setting, "l2sp", trainable * bytes_per, 0, trainable * bytes_per / n, (trainable * bytes_per / n, 0), "1 x trainable (anchor)"))
        rows.append((setting, "ewc", 2 * trainable * bytes_per, trainable * 4, (2 * trainable * bytes_per + trainable * 4) / n,
                     (2 * trainable * bytes_per / n, trainable * 4 / n),
                     "2 x trainable on the device; Fisher fp32 on the CPU (FSDP2: its shards on the device; ZeRO-3: partitions)"))
        rows.append((setting, f"ewc, while the Fisher is estimated (chunk_size {chunk})", chunk * trainable * bytes_per, 0,
                     chunk * trainable * bytes_per, (chunk * trainable * bytes_per, 0), "chunk_size x trainable, transient, before sharding"))
        kl = 0 if adapters else total * bytes_per
        rows.append((setting, "kl", kl, 0, kl / n, (kl, 0),
                     "adapters off" if adapters else "frozen copy of the model (ZeRO-3: whole on every process)"))
        rows.append((setting, "mofo", trainable * bytes_per, 0, refused, refused, "1 x trainable during the step"))
        rows.append((setting, f"a-gem / gem ({groups} group)", groups * trainable * bytes_per, 0, refused, refused, "1 x trainable per group"))
        rows.append((setting, "budget (restore on)", 0, trainable * bytes_per, refused, refused, "1 x trainable on the CPU"))
        rows.append((setting, "mix, replay, synthetic replay", 0, 0, 0, (0, 0), "no per-parameter state"))
        rows.append((setting, "flow, dft, eaft", 0, 0, refused, refused, "no per-parameter state"))
    setting = "full fine-tuning, float32 weights"
    rows.append((setting, "the run itself: weights, gradients, AdamW", total * 16, 0, total * 16 / n, (total * 16 / n, 0), "4 x trainable, 4 bytes each"))
    for what, kept in (("l2sp / ewc anchors, anchor_dtype auto", 4), ("l2sp / ewc anchors, anchor_dtype bfloat16", 2)):
        rows.append((setting, what, total * kept, 0, total * kept / n, (total * kept / n, 0), f"1 x trainable, {kept} bytes (EWC: twice, with weight x Fisher)"))
    lines = [f"Llama-3.1-8B shapes: {total:,} parameters; LoRA r={r} on every linear layer of the blocks: {lora:,} "
             f"({100 * lora / total:.2f}%); weights in bfloat16 ({bytes_per} bytes) unless the row says otherwise.", "",
             f"| trained | what | device GB | CPU GB | device GB per process, FSDP2 x {n} | ZeRO-3 x {n} per process: device / CPU GB | rule |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for setting, what, device, cpu, sharded, zero3, rule in rows:
        shard = "refused" if sharded is None else f"{sharded / GB:,.1f}"
        z3 = "refused" if zero3 is None else f"{zero3[0] / GB:,.1f} / {zero3[1] / GB:,.1f}"
        lines.append(f"| {setting} | {what} | {device / GB:,.1f} | {cpu / GB:,.1f} | {shard} | {z3} | {rule} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=8, help="EWC's methods.ewc.chunk_size")
    ap.add_argument("--processes", type=int, default=8, help="processes FSDP2 shards over (the last column)")
    args = ap.parse_args()
    print(table(r=args.r, chunk=args.chunk_size, processes=args.processes))


if __name__ == "__main__":
    main()

"""Write the built-in tiny Llama and its tokenizer as a GGUF file, the way llama.cpp's
``convert_hf_to_gguf.py`` writes a Llama: F32 tensors under llama.cpp's names (q/k rows permuted
to its rotary layout), the model's shape under ``llama.*`` and a byte-level BPE tokenizer under
``tokenizer.ggml.*`` (``model = "gpt2"``, tokens, token types, merges, special ids, chat template),
which is what transformers' GGUF tokenizer converter reads back.

A test helper: it lets the GGUF tests run offline in a second, without a downloaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NORMAL, CONTROL = 1, 3  # llama.cpp's token types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout of a q/k projection (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tokenizer, path: Path, architecture: str = "llama") -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) to ``path``.

    ``architecture`` is written as ``general.architecture``; another name makes a file that
    transformers' GGUF loader refuses (for the error test).
    """
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("forgetless tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # The tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2 writes it.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)

    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().cpu().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # tied: llama.cpp writes no output.weight
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            if module == "self_attn.q_proj":
                data = _permute(data, heads)
            elif module == "self_attn.k_proj":
                data = _permute(data, kv_heads)
            out = f"blk.{layer}.{names[module]}.{kind}"
        w.add_tensor(out, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

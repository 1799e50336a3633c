"""The built-in tiny model: a random-init Llama with its own byte-level BPE tokenizer.

It exists so that everything in forgetless can run offline and fast: tests, the demo, trying a
config before pointing it at a real model. It is a real ``LlamaForCausalLM`` and a real
``PreTrainedTokenizerFast`` with a ChatML chat template, so it goes through exactly the same code
paths (loading, chat rendering, saving, PEFT) as a hub model.

The tokenizer is trained once with the ``tokenizers`` library on the text shipped in
``forgetless/data/shipped`` and stored in ``tiny_tokenizer/``; :func:`train_tokenizer` rebuilds it
(``python -m forgetless.models.tiny``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from forgetless.config import TinyModelConfig

TOKENIZER_DIR = Path(__file__).parent / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(out_dir: Path = TOKENIZER_DIR) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the shipped datasets' text and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from forgetless.data.builtin import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    fast = _wrap(tok)
    fast.save_pretrained(str(out_dir))
    return fast


def _wrap(tok) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=TinyModelConfig().max_position_embeddings,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tokenizer of the tiny model."""
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def build_tiny_model(shape: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int,
                     attn_implementation: Optional[str] = None) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


if __name__ == "__main__":
    t = train_tokenizer()
    print(f"tokenizer with {len(t)} tokens saved to {TOKENIZER_DIR}")

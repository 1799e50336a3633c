"""``forgetless eval``: score a model or a run directory on any number of datasets."""

from __future__ import annotations

from typing import Optional, Union

import torch

from forgetless.config import DataConfig, DatasetSpec, ModelConfig
from forgetless.data.formats import Encoder
from forgetless.eval.scoring import score_examples
from forgetless.models import load_model, load_tokenizer
from forgetless.progress import eval_progress


def evaluate(
    model: str,
    data: dict[str, Union[str, DatasetSpec]],
    *,
    batch_size: int = 16,
    max_examples: Optional[int] = None,
    generation: bool = True,
    max_new_tokens: int = 32,
    max_length: int = 1024,
    chat_template: Optional[str] = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Scores of ``model`` (a run directory, a model directory, a hub id, or 'tiny') on each named dataset.

    Returns ``{name: {"loss", "perplexity", "token_accuracy", "exact_match", "examples", ...}}``.
    """
    from forgetless.recipes.finetune import encode_dataset

    model_cfg = ModelConfig(name_or_path=str(model), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_cfg)
    specs = {name: DatasetSpec(path=s) if isinstance(s, str) else s for name, s in data.items()}
    data_cfg = DataConfig(max_length=max_length, chat_template=chat_template)
    encoder = Encoder(tokenizer, data_cfg)
    sets = {}
    for name, spec in specs.items():
        examples, _ = encode_dataset(encoder, [spec])
        sets[name] = examples[:max_examples] if max_examples else examples
    lm = load_model(model_cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(device)
    results = {}
    for name, examples in sets.items():
        with eval_progress(len(examples), f"eval {name}", progress) as advance:
            results[name] = score_examples(
                lm, examples, tokenizer, batch_size=batch_size, generation=generation,
                max_new_tokens=max_new_tokens, device=device, on_batch=advance,
            )
    return results

"""forgetless: fine-tune Hugging Face causal LMs without catastrophic forgetting, and prove it.

The Python API mirrors the CLI::

    import forgetless
    cfg = forgetless.load_config("run.yaml", ["train.lr=1e-4"])
    result = forgetless.train(cfg)          # before/after scores of every eval and keep set
    scores = forgetless.evaluate("runs/x", {"capitals": "demo:capitals"})
"""

__version__ = "0.1.0"

from forgetless.config import RunConfig, load_config
from forgetless.errors import UserError


def train(cfg):
    """Fine-tune per a :class:`RunConfig`; see :func:`forgetless.recipes.finetune.train`."""
    from forgetless.recipes.finetune import train as _train

    return _train(cfg)


def evaluate(model, data, **kwargs):
    """Score a model or run directory on named datasets; see :func:`forgetless.eval.run.evaluate`."""
    from forgetless.eval.run import evaluate as _evaluate

    return _evaluate(model, data, **kwargs)


__all__ = ["RunConfig", "UserError", "load_config", "train", "evaluate", "__version__"]

"""forgetless: fine-tune Hugging Face causal LMs without catastrophic forgetting, and prove it.

The Python API mirrors the CLI::

    import forgetless
    cfg = forgetless.load_config("run.yaml", ["train.lr=1e-4"])
    result = forgetless.train(cfg)          # before/after scores of every eval and keep set
    scores = forgetless.evaluate("runs/x", {"capitals": "demo:capitals"})
    seq = forgetless.run_sequence(forgetless.load_config("sequence.yaml"), compare=True)
    seq.results["strategies"]["ewc"]["matrix"]   # the accuracy matrix R[t][k]
"""

__version__ = "0.1.0"

from forgetless import registry as _registry


def _builtin_methods() -> None:
    import forgetless.methods  # noqa: F401  (each module registers its method)


_registry.add_source(_builtin_methods)  # imported when the registry is first read, not before

from forgetless.config import RunConfig, load_config  # noqa: E402
from forgetless.errors import UserError  # noqa: E402


def train(cfg):
    """Fine-tune per a :class:`RunConfig`; see :func:`forgetless.recipes.finetune.train`."""
    from forgetless.recipes.finetune import train as _train

    return _train(cfg)


def evaluate(model, data, **kwargs):
    """Score a model or run directory on named datasets; see :func:`forgetless.eval.run.evaluate`."""
    from forgetless.eval.run import evaluate as _evaluate

    return _evaluate(model, data, **kwargs)


def run_sequence(cfg, compare: bool = False, resume: bool = False):
    """Train a task sequence (``cfg.tasks``) with one strategy, or every strategy of
    ``cfg.continual.strategies`` when ``compare``; see :mod:`forgetless.recipes.continual`."""
    from forgetless.recipes.continual import run_sequence as _run_sequence

    return _run_sequence(cfg, compare=compare, resume=resume)


__all__ = ["RunConfig", "UserError", "load_config", "train", "evaluate", "run_sequence", "__version__"]

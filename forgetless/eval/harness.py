"""lm-evaluation-harness tasks scored on the in-memory model (``eval.harness``).

The model being trained is wrapped in lm-eval's ``HFLM`` as it is (no reloading, no download of
weights) and scored with ``lm_eval.simple_evaluate`` on the configured tasks. Each task becomes a
set named ``harness/<task>`` whose result holds lm-eval's metrics (``acc``, ``acc_norm``, ...;
a filter other than ``none`` stays in the name, e.g. ``exact_match,strict-match``), the number
of documents scored (``examples``) and ``score``: the task's first metric, or ``eval.harness.metric``.

Tasks are looked up when the run is prepared, so a wrong task name, a missing include_path or
an unreadable dataset fails before training. Local tasks need no network: a task YAML with
``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}`` reads a local JSONL file.
lm-eval's seeding is switched off and the random states of python, numpy and torch are restored
afterwards, so scoring does not change the training run. Needs ``pip install 'forgetless[harness]'``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from typing import Optional

import torch

from forgetless.errors import UserError

PREFIX = "harness/"


class HarnessTasks:
    """The configured lm-eval tasks, looked up once; :meth:`evaluate` scores a model on all of them."""

    def __init__(self, tasks: list[str], *, include_path: Optional[str], limit: Optional[int], num_fewshot: Optional[int],
                 batch_size: int, metric: Optional[str]):
        try:
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError:
            raise UserError("eval.harness.tasks needs lm-evaluation-harness: pip install 'forgetless[harness]'") from None
        self.tasks, self.limit, self.num_fewshot, self.batch_size = list(tasks), limit, num_fewshot, batch_size
        with _quiet_lm_eval():
            # Indexing lm-eval's thousands of built-in task files takes a while: skip it when the
            # include_path holds every task asked for.
            manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
            if manager is None or not all(t in manager.all_tasks for t in self.tasks):
                manager = TaskManager(include_path=include_path)
            missing = [t for t in self.tasks if t not in manager.all_tasks]
            if missing:
                raise UserError(
                    f"eval.harness.tasks: unknown lm-eval task {missing[0]!r}; check the name (lm-eval --tasks list) "
                    f"or the task YAMLs under eval.harness.include_path"
                )
            try:
                loaded = get_task_dict(self.tasks, manager)
            except Exception as e:  # a task's dataset could not be read (offline, bad data_files, ...)
                raise UserError(f"eval.harness.tasks {', '.join(self.tasks)}: lm-eval could not load the tasks ({_one_line(e)})") from None
        self.manager = manager
        self.metrics = {t: metric or _first_metric(loaded.get(t)) for t in self.tasks}
        self.higher_is_better = {t: _direction(loaded.get(t), self.metrics[t]) for t in self.tasks}

    @property
    def set_names(self) -> list[str]:
        return [PREFIX + t for t in self.tasks]

    def evaluate(self, model, tokenizer, *, progress: bool = False) -> dict[str, dict[str, float]]:
        """``{"harness/<task>": {metric: value, ..., "examples": n, "score": ...}}`` of ``model``."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        states = random.getstate(), _numpy_state(), torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            with _quiet_lm_eval(show_bars=progress):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=self.tasks, task_manager=self.manager, limit=self.limit, num_fewshot=self.num_fewshot,
                    bootstrap_iters=0, log_samples=False, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                )
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"eval.harness: lm-eval failed on {', '.join(self.tasks)} ({_one_line(e)})") from None
        finally:
            model.train(was_training)
            random.setstate(states[0])
            _set_numpy_state(states[1])
            torch.random.set_rng_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        return {PREFIX + t: task_scores(out, t, self.metrics[t]) for t in self.tasks}


def task_scores(out: dict, task: str, metric: str) -> dict[str, float]:
    """One task's numbers from ``simple_evaluate``'s output: metrics (filter ``none`` dropped), examples, score."""
    raw = out["results"].get(task, {})
    scores: dict[str, float] = {}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scores[name if filt in ("", "none") else key] = float(value)
    samples = out.get("n-samples", {}).get(task, {})
    scores["examples"] = int(samples.get("effective", raw.get("sample_len", 0)) or 0)
    headline = metric if metric in scores else next((k for k in scores if k.split(",")[0] == metric), None)
    scores["score"] = scores.get(headline) if headline else None
    return scores


def _first_metric(task) -> str:
    try:
        return next(iter(task.higher_is_better()))
    except Exception:  # a group of tasks (no single metric list): lm-eval's usual headline
        return "acc"


def _direction(task, metric: str) -> bool:
    try:
        return bool(task.higher_is_better()[metric])
    except Exception:
        from forgetless.eval.headline import higher_is_better

        return higher_is_better(metric)


@contextlib.contextmanager
def _quiet_lm_eval(show_bars: bool = False):
    """lm-eval logs at INFO/WARNING (e.g. about receiving a model object) and draws tqdm bars."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if show_bars:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def _numpy_state():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - lm-eval depends on numpy
        return None
    return np.random.get_state()


def _set_numpy_state(state) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__

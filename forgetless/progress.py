"""What a command shows while it works: progress bars (rich) for training and evaluation, silent
where asked or off the main process, and the model libraries kept quiet around them."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Tables go to stderr with the bars; when it is not a terminal (a log file, CI), rich would wrap
# them at 80 columns, so give them room.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


class TrainProgress:
    """Step M/N, bar, loss, learning rate, tokens/s, elapsed and ETA."""

    def __init__(self, total_steps: int, enabled: bool, description: str = "train"):
        self.enabled = enabled
        self._progress: Optional[Progress] = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total_steps, loss="-", lr="-", tps="-")

    def __enter__(self) -> "TrainProgress":
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            self._progress.stop()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._progress:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tokens_per_s:,.0f}")

    def note(self, message: str) -> None:
        if self._progress:
            self._progress.console.print(message)


@contextmanager
def eval_progress(total: int, description: str, enabled: bool) -> Iterator:
    """A bar over examples; yields a callback that advances it."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(
        TextColumn("  [cyan]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


# Warnings the model libraries raise on forgetless's own path, which a user can do nothing about:
# (category, message pattern, why). Everything else is shown, once per place it comes from.
KNOWN_NOISE = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "PEFT asks transformers 5 for the old attribute name"),
)


def quiet_libraries() -> None:
    """Keep the model libraries' output to what a user can act on: forgetless shows its own progress.

    Their progress bars are off and their known noise (:data:`KNOWN_NOISE`) is silenced; every other
    warning, of transformers, PEFT, a chat template, a tokenizer or forgetless itself, is shown
    once, on one line: ``forgetless: warning: ...``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.simplefilter("once")  # a tokenizer or template warning raised per record is shown once
    for category, pattern, _ in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.showwarning = _show_warning
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()  # transformers' own warning_once messages stay, its info goes
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line per warning; a library's names the package it comes from."""
    from forgetless.errors import ForgetlessWarning

    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    if not issubclass(category, ForgetlessWarning):
        package = _package_of(filename)
        text = f"{text} ({category.__name__}{' from ' + package if package else ''})"
    print(f"forgetless: warning: {text}", file=file or sys.stderr)


def _package_of(filename: str) -> str:
    parts = os.path.normpath(filename).split(os.sep)
    if "site-packages" in parts:
        i = parts.index("site-packages")
        if i + 1 < len(parts):
            return parts[i + 1].removesuffix(".py")
    return ""

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


def quiet_libraries() -> None:
    """Silence the model libraries' warnings, logs and progress bars: forgetless shows its own."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

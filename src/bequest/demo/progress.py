"""What the demo shows while it works: one line per stage (its name, optimizer steps done of those
planned, time so far, time left), rewritten in place on a terminal and printed every half minute
elsewhere; the verbs' own output goes to OUT/demo.log instead."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import transformers
import transformers.trainer


class Display:
    def __init__(self, stream, head: str, total: int):
        self.stream, self.head, self.total = stream, head, total
        self.done = 0
        self.start = self.shown = time.perf_counter()
        self.live = stream.isatty()
        if self.live:
            self.show(force=True)

    def advance(self, steps: int) -> None:
        self.done = min(self.total, self.done + steps)
        self.show()

    def show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.shown < (0.25 if self.live else 30):  # a log file gets a line a half-minute
            return
        self.shown, elapsed = now, now - self.start
        eta = _clock(elapsed * (self.total - self.done) / self.done) if self.done else "?"
        steps = f"{self.done}/{self.total} steps, " if self.total else ""
        text = f"{self.head}: {steps}{_clock(elapsed)} elapsed, ETA {eta}"
        self.stream.write(f"\r\033[K{text}" if self.live else text + "\n")
        self.stream.flush()

    def finish(self, line: str) -> float:
        seconds = time.perf_counter() - self.start
        self.stream.write(("\r\033[K" if self.live else "") + f"{self.head}: {line} ({_clock(seconds)})\n")
        self.stream.flush()
        return seconds


class _Steps(transformers.TrainerCallback):
    """Counts every optimizer step any Trainer takes into the current display."""

    def __init__(self):
        self.display, self.at = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.at = 0  # a run resumed from a checkpoint counts the steps it had done with its first step

    def on_step_end(self, args, state, control, **kwargs):
        if self.display is not None:
            self.display.advance(state.global_step - self.at)
        self.at = state.global_step


@contextlib.contextmanager
def watched(log: Path):
    """While the demo runs: every Trainer reports its steps to the stage's display (the verbs build their
    Trainers themselves, so the hook goes where transformers looks for default callbacks, and the
    progress bar's place gets a silent callback), and what the verbs print goes to `log`."""
    steps = _Steps()
    saved = (transformers.trainer.DEFAULT_CALLBACKS, transformers.trainer.DEFAULT_PROGRESS_CALLBACK)
    verbosity = transformers.logging.get_verbosity()
    transformers.trainer.DEFAULT_CALLBACKS = [*saved[0], steps]
    transformers.trainer.DEFAULT_PROGRESS_CALLBACK = transformers.TrainerCallback
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets_logger = logging.getLogger("datasets")
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        level = datasets_logger.level
        datasets_logger.setLevel(logging.ERROR)
        try:
            yield steps
        finally:
            transformers.trainer.DEFAULT_CALLBACKS, transformers.trainer.DEFAULT_PROGRESS_CALLBACK = saved
            transformers.logging.set_verbosity(verbosity)
            transformers.utils.logging.enable_progress_bar()
            datasets_logger.setLevel(level)
            if bars:
                datasets.enable_progress_bars()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"

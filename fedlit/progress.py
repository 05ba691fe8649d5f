"""What a run shows while it trains: a progress bar on a terminal, one plain line per round elsewhere (a log file,
``make``, CI, a notebook's captured output), nothing when asked for nothing (``trainer.progress``)."""

from __future__ import annotations

import math
import sys
import time

_SHORT = {"local": "Local", "base": "Base", "novel": "Novel", "hm": "HM"}


class Progress:
    """``mode``: ``bar`` (tqdm on stderr), ``lines`` (one line per round on stdout) or ``off``.

    ``trainer.progress``: ``true`` = bar, ``false`` = off, ``null`` = bar when stderr is a terminal, else lines.
    """

    def __init__(self, name: str, total: int, done: int = 0, setting: bool | None = None, enabled: bool = True):
        if not enabled or setting is False:
            self.mode = "off"
        elif setting is True or sys.stderr.isatty():
            self.mode = "bar"
        else:
            self.mode = "lines"
        self.name, self.total, self.t0 = name, total, time.time()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"{name} rounds", unit="round", dynamic_ncols=True)

    def round_done(self, rnd: int, metrics: dict, loss: float | None = None) -> None:
        """Round ``rnd`` (0-based) finished; ``metrics`` = the latest evaluation (``{"mean": {...}}``)."""
        mean = metrics.get("mean", {}) if metrics else {}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.1f}" for k, v in mean.items()})
        elif self.mode == "lines":
            now = time.time()
            parts = [f"{self.name} round {rnd + 1}/{self.total}", f"{now - self.t0:.1f} s"]
            if loss is not None and math.isfinite(loss):
                parts.append(f"loss {loss:.4f}")
            parts += [f"{_SHORT.get(k, k)} {v:.2f}" for k, v in mean.items()]
            print("  ".join(parts), flush=True)
            self.t0 = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["Progress"]

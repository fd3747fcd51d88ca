"""Progress for people (tqdm bars) and for programs (one JSON object per line on stdout).

The JSON-lines protocol is what the Slicer module parses while it runs the CLI in a child process:
``{"event": "progress", "stage": ..., "done": i, "total": n, "fraction": f}`` and friends (see README).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
MODES = ("bar", "jsonl", "none")


class Reporter:
    """Reports events and stage progress.

    Args:
        mode: ``"bar"`` (tqdm on stderr, log lines on stderr), ``"jsonl"`` (JSON lines on stdout), ``"none"``.
        enabled: False on non-zero ranks of a distributed run, so only one process talks.
        min_interval: seconds between two jsonl progress lines of the same stage (the last one always goes out).
    """

    def __init__(self, mode: str = "bar", enabled: bool = True, min_interval: float = 0.2):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}")
        self.mode = mode if enabled else "none"
        self.min_interval = min_interval
        # Overall fraction of a multi-stage job: stages done so far and the planned total, both in work units.
        self.units_done = 0.0
        self.units_total: float | None = None

    def emit(self, event: str, **fields: Any) -> None:
        if self.mode == "jsonl":
            sys.stdout.write(json.dumps({"event": event, **fields}, default=_jsonable) + "\n")
            sys.stdout.flush()

    def log(self, message: str) -> None:
        if self.mode == "jsonl":
            self.emit("log", message=message)
        elif self.mode == "bar":
            tqdm.write(message, file=sys.stderr)

    def warn(self, message: str) -> None:
        """Warnings reach a person whatever the progress mode (stderr), and programs too in jsonl mode."""
        print(f"iltm: warning: {message}", file=sys.stderr, flush=True)
        self.emit("log", message=f"warning: {message}", level="warning")

    def overall(self, stage_fraction: float, stage_units: float) -> float | None:
        if not self.units_total:
            return None
        return min(1.0, (self.units_done + stage_fraction * stage_units) / self.units_total)

    def track(self, items: Iterable[T], stage: str, total: int | None = None, units: float = 0.0,
              **fields: Any) -> Iterator[T]:
        """Iterate ``items`` while reporting ``stage`` progress; ``units`` is this stage's share of the whole job."""
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        if self.mode == "bar":
            yield from tqdm(items, total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=False)
        elif self.mode == "jsonl":
            last = 0.0
            done = 0
            for done, item in enumerate(items, start=1):
                yield item
                now = time.monotonic()
                if now - last >= self.min_interval or done == total:
                    last = now
                    frac = done / total if total else None
                    self.emit("progress", stage=stage, done=done, total=total,
                              fraction=self.overall(frac, units) if frac is not None else None, **fields)
        else:
            yield from items
        self.units_done += units


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)

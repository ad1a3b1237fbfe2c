"""What a long command is doing: progress on a terminal, plain lines elsewhere, a summary.

A ``Reporter`` is what compile (and its helpers) log through: called with a message it prints
``[ffc] message``; ``phase(name, total)`` times a step of the work and ``advance(n)`` moves its
bar (passes run, weight bytes written, objects ninja compiled). On a terminal (stderr is a
TTY and ``--quiet`` was not given) phases are rich progress rows: a spinner, a bar where the
amount is known, the elapsed time; messages print above them. Elsewhere (a pipe, a file, CI)
a phase is one plain line when it ends (its seconds and notes) and nothing is redrawn: no
carriage returns, no escape codes.
``--quiet`` prints nothing but errors. transformers' own tqdm bars (weight loading, saving)
are turned off while a reporter is active (they would interleave with ours, and write carriage
returns into logs); its GGUF conversion loop becomes one of our rows (per tensor) on a terminal.
``summary()`` is the closing table: phase, seconds, and what each phase noted (cache hits,
bytes and rates).
"""
from __future__ import annotations

import importlib
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False, stream=None, live: Optional[bool] = None,
                 sink: Optional[Callable[[str], None]] = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.sink = sink             # another reporter's (or a caller's) line printer: lines go there
        self.live = (not quiet and sink is None and self.stream.isatty()) if live is None else live
        self.phases: list[tuple[float, int, str, float, str]] = []   # start, depth, name, seconds, notes
        self._notes: list[str] = []
        self._depth = 0
        self._t0 = time.perf_counter()
        self._task = None
        self._rows = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                              TimeElapsedColumn(), console=Console(file=self.stream)) if self.live else None
        self._hf_bars: Optional[bool] = None

    @classmethod
    def of(cls, log) -> "Reporter":
        """``log`` itself when it is a reporter, else a reporter printing through it (no rows)."""
        return log if isinstance(log, Reporter) else cls(sink=log)

    def __call__(self, message: str) -> None:
        if self.sink is not None:
            self.sink(message)
        elif self.quiet:
            return
        elif self._rows is not None:
            self._rows.console.print(f"[ffc] {message}", markup=False, highlight=False)
        else:
            print(f"[ffc] {message}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """Something the running phase's summary row should say (e.g. a cache hit)."""
        self._notes.append(text)

    @contextmanager
    def phase(self, name: str, total: Optional[float] = None):
        """Time ``name``; a bar of ``total`` units on a terminal (advance() moves it)."""
        outer = self._task, self._notes
        self._notes = []
        self._depth += 1
        t0 = time.perf_counter()
        if self._rows is not None:
            self._task = self._rows.add_task(name, total=total)
        ok = False
        try:
            yield self
            ok = True
        finally:
            if self._rows is not None:
                self._rows.update(self._task, total=total or 1, completed=total or 1)
            self._depth -= 1
            seconds, note = time.perf_counter() - t0, "; ".join(self._notes)
            self.phases.append((t0, self._depth, name, seconds, note))
            if ok and self._rows is None and self.sink is None:      # plain lines: one per phase, when done
                self(f"{name}: {seconds:.1f} s" + (f" ({note})" if note else ""))
            self._task, self._notes = outer

    def advance(self, n: float = 1, total: Optional[float] = None) -> None:
        if self._rows is not None and self._task is not None:
            self._rows.update(self._task, advance=n, **({"total": total} if total is not None else {}))

    def _gguf_bar(self, iterable, desc: str = "", **_):
        """transformers' GGUF conversion loop (its own tqdm, which ignores disable_progress_bar):
        a row of ours on a terminal, else nothing."""
        if self._rows is None:
            return iterable
        items = list(iterable)
        task = self._rows.add_task(desc.rstrip(". "), total=len(items))

        def each():
            for x in items:
                yield x
                self._rows.update(task, advance=1)
        return each()

    def __enter__(self) -> "Reporter":
        # transformers, where this process has imported it (a compile has; `ffc run --batch-file` has
        # not: it would cost a second to import only to quiet it)
        hf = "transformers" in sys.modules
        self._hf_logging = importlib.import_module("transformers.utils.logging") if hf else None
        self._hf_gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if hf else None
        if self._hf_logging is not None:
            self._hf_bars = self._hf_logging.is_progress_bar_enabled()
            self._hf_logging.disable_progress_bar()
        if self._hf_gguf is not None:
            self._gguf_tqdm, self._hf_gguf.tqdm = self._hf_gguf.tqdm, self._gguf_bar
        if self._rows is not None:
            self._rows.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._rows is not None:
            self._rows.stop()
        if self._hf_gguf is not None:
            self._hf_gguf.tqdm = self._gguf_tqdm
        if self._hf_bars:
            self._hf_logging.enable_progress_bar()

    def summary(self, title: str = "compile") -> str:
        """The phases in the order they began (a phase within another indented under it):
        seconds each and what they noted; the total is the wall time since the reporter began."""
        rows = [("  " * depth + name, sec, note) for _, depth, name, sec, note in sorted(self.phases)]
        width = max([len(n) for n, _, _ in rows] + [len(title) + 6])
        lines = [f"{'phase':{width}s} {'seconds':>8}  notes"]
        lines += [f"{name:{width}s} {sec:8.1f}  {note}".rstrip() for name, sec, note in rows]
        lines.append(f"{title + ' total':{width}s} {time.perf_counter() - self._t0:8.1f}")
        return "\n".join(lines)

"""What a user sees while a stage runs, and where the rest goes.

The terminal gets one live progress line per stage, rendered on the driver from the run's
``metrics.jsonl`` (step/total, loss, throughput, ETA; RL: reward, KL, log-prob gap), then
one line when the stage ends. What Ray, DeepSpeed and vLLM print inside the workers goes
to ``runs/<name>/logs/<process>.log`` instead; ``raystages --verbose`` (or
``RAYSTAGES_VERBOSE=1``) streams all of it to the terminal as before.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from raystages import atomic

VERBOSE_ENV = "RAYSTAGES_VERBOSE"
LOGS_DIR = "logs"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbose(on: bool) -> None:
    """The CLI's ``--verbose``; the variable travels to the workers in their runtime env."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def capture_process_output(run_dir: str | Path, name: str) -> None:
    """Send this process's stdout and stderr to ``run_dir/logs/<name>.log`` (unless verbose).

    File descriptors 1 and 2 are redirected, not ``sys.stdout``: DeepSpeed's C++ ops, gloo
    and vLLM's engine write to them directly."""
    if verbose():
        return
    logs = Path(run_dir) / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# --- start-up phases: where the time before the first optimizer step goes ----------------

STARTUP_FILE = "startup.json"
_marks: list[tuple[str, float]] = []
_stage_t0: float | None = None  # None: the stage started with the process (the CLI)


def begin_stage() -> None:
    """A stage starts now in a process that ran others before it (a pipeline)."""
    global _stage_t0
    _stage_t0 = time.time()
    _marks.clear()


def mark(phase: str) -> None:
    """The driver finished ``phase`` now (``data``, ``tokenizer``, ``ray``, ``dataset``, ...)."""
    _marks.append((phase, time.time()))


def take_driver_marks() -> dict:
    """``{"t0", "marks"}`` of the stage about to start training: since the process started
    (imports included) or since :func:`begin_stage`. Clears the marks for the next stage."""
    import psutil

    t0 = _stage_t0 if _stage_t0 is not None else psutil.Process().create_time()
    taken = {"t0": t0, "marks": list(_marks)}
    _marks.clear()
    return taken


def phase_seconds(t0: float, marks: list[tuple[str, float]]) -> dict[str, float]:
    """``{phase: seconds}`` from consecutive marks, the first counted from ``t0``; a phase
    marked twice (a second stage in one process) counts from the previous mark."""
    out, last = {}, t0
    for phase, t in sorted(marks, key=lambda m: m[1]):
        if t < t0:
            continue
        out[phase] = round(out.get(phase, 0.0) + t - last, 2)
        last = t
    return out


def write_startup(run_dir: str | Path, driver: dict, worker_marks: list[tuple[str, float]]) -> dict:
    """Rank 0, after its first optimizer step: every phase since the command started, in
    ``run_dir/startup.json`` (the driver prints it; ``bench data`` reads it)."""
    marks = [*driver["marks"], *worker_marks]
    startup = {"phases": phase_seconds(driver["t0"], marks),
               "seconds_to_first_step": round(marks[-1][1] - driver["t0"], 2), "t0": driver["t0"]}
    atomic.write_text(Path(run_dir) / STARTUP_FILE, json.dumps(startup))
    return startup


def startup_line(startup: dict) -> str:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in startup["phases"].items())
    return f"startup: {phases} (first step {startup['seconds_to_first_step']:.1f} s after the command)"


def describe(record: dict) -> str:
    """The figures of one metrics record that a person follows, in one short line."""
    parts = []
    for key, label in (("loss", "loss"), ("val_loss", "val"), ("val_pair_accuracy", "pair acc"),
                       ("reward", "reward"), ("reward_oracle", "oracle"), ("kl_ref", "kl"),
                       ("logprob_gap_mean", "gap")):
        if isinstance(record.get(key), (int, float)):
            value = record[key]
            parts.append(f"{label} {value:.1e}" if key == "logprob_gap_mean" else f"{label} {value:.3g}")
    if isinstance(record.get("throughput"), (int, float)):
        parts.append(f"{record['throughput']:,.0f}/s")
    return " · ".join(parts)


def finished_line(stage: str, metrics: dict, export_dir) -> str:
    """The one line a finished stage leaves on the terminal."""
    shown = []
    held_out = [k for k in metrics if k.startswith("held_out_")]  # task heads' final scores
    for key in ("step", "iterations", "loss", "val_loss", "pair_accuracy", "accuracy_before", "accuracy_after",
                "reward_before", "reward_after", *held_out, "skipped_rows"):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            shown.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    wall = metrics.get("wall_s")
    took = f" in {wall:.0f} s" if isinstance(wall, (int, float)) else ""
    return f"raystages: {stage} finished{took} · {' · '.join(shown)} -> {export_dir}"


class StageProgress:
    """Follows ``run_dir/metrics.jsonl`` from a driver thread while a stage runs.

    On a terminal: one live bar (rich), cleared at the end. Elsewhere (CI, a pipe, a Ray
    job's log): a plain line at every tenth of the run, so a log stays short. Records that
    were in the file before the stage started (a resumed run) are not shown again."""

    def __init__(self, stage: str, run_dir: Path, total: int, step_key: str = "step"):
        self.stage, self.total, self.step_key = stage, total, step_key
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True, name=f"progress-{stage}")
        self.started = time.time()
        self.startup_shown = False

    def __enter__(self):
        if not verbose():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        return False

    def _records(self):
        if not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break  # a line still being written: read it next time
                self.offset += len(line.encode())
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def _startup(self, say) -> None:
        """Print the start-up phases once, when rank 0 has written them."""
        if self.startup_shown:
            return
        path = self.path.parent / STARTUP_FILE
        if path.is_file() and path.stat().st_mtime >= self.started - 1:
            try:
                startup = json.loads(path.read_text())
            except json.JSONDecodeError:
                return  # being written
            self.startup_shown = True
            say(f"  {self.stage} {startup_line(startup)}")

    def _follow(self) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            self._follow_live(console)
        else:
            self._follow_plain()

    def _follow_live(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn(f"[bold]{self.stage:<8}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(self.stage, total=self.total, info="starting")
            while True:
                stopping = self.done.wait(0.5)  # one more pass after the stage ends: nothing unread
                self._startup(bar.console.print)
                for record in self._records():
                    bar.update(task, completed=record.get(self.step_key, 0), info=describe(record))
                if stopping:
                    break

    def _follow_plain(self) -> None:
        shown = 0
        every = max(1, self.total // 10)
        while True:
            stopping = self.done.wait(1.0)  # one more pass after the stage ends: nothing unread
            self._startup(lambda line: print(line, file=sys.stderr, flush=True))
            for record in self._records():
                step = int(record.get(self.step_key, 0))
                if step >= shown + every or step == self.total:
                    shown = step
                    elapsed = time.time() - self.started
                    print(f"  {self.stage} {step}/{self.total} · {describe(record)} · {elapsed:.0f}s",
                          file=sys.stderr, flush=True)
            if stopping:
                break

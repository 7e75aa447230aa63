"""Watching a real training run from the test process: its logged metrics, its registered
checkpoints, and a worker killed by PID part-way (the fault tests of every stage)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path


def logged_metrics(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` rows so far ([] before the first)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_registered_checkpoint(run_dir: Path, timeout: float = 300) -> None:
    """Ray Train's controller registers a reported checkpoint a moment after the workers
    report it; a crash in between falls back to the previous one. Wait for the registry."""
    deadline = time.time() + timeout
    while not (run_dir / "checkpoint_manager_snapshot.json").exists():
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint registered in {run_dir}")
        time.sleep(0.2)


def kill_a_worker_past_a_checkpoint(run_dir: Path, checkpoint_every: int, timeout: float = 300) -> None:
    """SIGKILL one Ray Train worker once a checkpoint is registered and a step past it (not at
    a checkpoint boundary) is logged, so the restarted group must log some steps again
    however slowly the machine runs."""
    from ray.util.state import list_actors

    wait_for_registered_checkpoint(run_dir, timeout)
    deadline = time.time() + timeout
    while ((last := max((m["step"] for m in logged_metrics(run_dir)), default=0)) <= checkpoint_every
           or last % checkpoint_every == 0):
        assert time.time() < deadline, "no step logged after the first checkpoint"
        time.sleep(0.1)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(workers[0].pid, signal.SIGKILL)


def run_killing_a_worker(run, spec, checkpoint_every: int):
    """``run(spec)`` (a stage's run) with one worker killed past a checkpoint, as above; its result."""
    out: dict = {}

    def target():
        try:
            out["result"] = run(spec)
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        kill_a_worker_past_a_checkpoint(spec.run_dir(), checkpoint_every)
    finally:  # a run that failed before its checkpoint reports its own error, not the wait's
        thread.join(timeout=600)
        if "error" in out:
            raise out["error"]
    return out["result"]

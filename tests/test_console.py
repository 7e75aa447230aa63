"""What the terminal shows: progress from metrics.jsonl, start-up phases, the finished line
(no Ray: these read and write files the workers write)."""

from __future__ import annotations

import json

from raystages.train.console import StageProgress, describe, finished_line, phase_seconds, startup_line


def test_phases_are_the_gaps_between_marks_counted_from_the_start():
    marks = [("spec", 101.0), ("ray", 104.5), ("datasets", 110.0), ("workers", 112.0), ("first step", 113.0)]
    assert phase_seconds(100.0, marks) == {"spec": 1.0, "ray": 3.5, "datasets": 5.5, "workers": 2.0,
                                           "first step": 1.0}
    line = startup_line({"phases": {"spec": 1.0, "ray": 3.5}, "seconds_to_first_step": 4.5})
    assert line == "startup: spec 1.0 s, ray 3.5 s (first step 4.5 s after the command)"


def test_progress_follows_new_records_only_and_prints_a_line_per_tenth(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 50, "loss": 9.0}) + "\n")  # a resumed run's old record
    with StageProgress("pretrain", tmp_path, total=100):
        with log.open("a") as f:
            for step in range(10, 101, 10):
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "throughput": 1234.0}) + "\n")
            f.flush()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("  pretrain 10/100 · loss 0.1 · 1,234/s")
    assert lines[-1].startswith("  pretrain 100/100") and len(lines) == 10
    assert not any("9" in ln.split("·")[1] for ln in lines)  # the old record is not shown again


def test_one_line_when_a_stage_ends():
    line = finished_line("sft", {"step": 300, "val_loss": 0.51234, "accuracy_after": 0.75, "wall_s": 86.6,
                                 "samples": []}, "runs/sft/model")
    assert line == "raystages: sft finished in 87 s · step 300 · val_loss 0.5123 · accuracy_after 0.75 -> runs/sft/model"
    assert describe({"reward": 0.5, "kl_ref": 0.01, "logprob_gap_mean": 2e-7}) == "reward 0.5 · kl 0.01 · gap 2.0e-07"

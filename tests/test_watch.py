"""``cnntrain eval --watch``: every checkpoint scored once, rows in metrics.csv, exit after summary.json."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import pytest

import cnntrain
from cnntrain.cli import main
from cnntrain.engine.metrics import COLUMNS, MetricsLog, append_row_once, read_metrics
from cnntrain.watch import WatchTimeout, run_finished, watch
from tests.helpers import tiny


def test_watch_scores_each_checkpoint_once_and_stops(tmp_path: Path, capsys) -> None:
    run = cnntrain.train(tiny(tmp_path / "run", epochs=3, keep_last=5)).run_dir
    (run / "checkpoints" / "step-00000099.pt").write_bytes(b"half written")  # no manifest: never scored
    os.utime(run / "checkpoints" / "step-00000099.pt", ns=(0, 0))  # from before the run finished
    scored = watch(run, poll=0.01)
    assert [step for step, _ in scored] == [8, 16, 24]
    final = cnntrain.evaluate(run)
    assert scored[-1][1].top1 == final.top1 and scored[-1][1].count == final.count
    # A second watcher scores them again but adds no rows.
    assert main(["eval", "--watch", str(run), "--poll", "0.01"]) == 0
    assert capsys.readouterr().out.count("top-1") == 3
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "eval"]
    assert [int(r["step"]) for r in rows] == [8, 16, 24]


def test_timeout_stops_a_watch_of_a_run_that_makes_no_progress(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    started = time.monotonic()
    with pytest.raises(WatchTimeout, match=r"no new checkpoint in .*checkpoints for 0.3 s .* scoring 0") as err:
        watch(tmp_path, poll=0.02, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 10
    assert err.value.scored == []


def test_a_summary_written_after_the_watch_started_ends_it(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    threading.Timer(0.3, lambda: (tmp_path / "summary.json").write_text("{}")).start()
    assert watch(tmp_path, poll=0.02, timeout=30) == []


def test_a_summary_older_than_a_checkpoint_is_from_before_a_resume(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    os.utime(tmp_path / "summary.json", ns=(10**18, 10**18))
    assert run_finished(tmp_path)
    (tmp_path / "checkpoints" / "step-00000008.pt").write_bytes(b"being written by the resumed run")
    assert not run_finished(tmp_path)
    with pytest.raises(WatchTimeout):
        watch(tmp_path, poll=0.02, timeout=0.2)


def _csv(path: Path, rows: list[tuple[int, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for step, split in rows:
            writer.writerow([step, "", split, "1.0"] + [""] * (len(COLUMNS) - 4))


def test_rows_already_there_are_not_appended_again_even_by_concurrent_watchers(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    _csv(path, [(4, "train"), (8, "eval")])
    assert not append_row_once(path, step=8, split="eval", loss="0.5")
    assert append_row_once(path, step=8, split="test", loss="0.5")  # another split: its own row

    def watcher() -> None:
        for step in range(12, 52, 4):
            append_row_once(path, step=step, split="eval", loss="0.5")

    threads = [threading.Thread(target=watcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    eval_steps = [int(r["step"]) for r in read_metrics(path) if r["split"] == "eval"]
    assert sorted(eval_steps) == list(range(8, 52, 4))


def test_a_resumed_run_keeps_the_rows_a_watcher_appended(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    _csv(path, [(4, "train"), (8, "train"), (8, "test"), (8, "eval"), (12, "train"), (12, "test"), (12, "eval"),
                (16, "eval")])
    MetricsLog(path, resume_step=8).close()
    assert [(int(r["step"]), r["split"]) for r in read_metrics(path)] == [
        (4, "train"), (8, "train"), (8, "test"), (8, "eval"), (12, "eval"), (16, "eval")]

"""``cnntrain eval --watch``: every checkpoint scored once, rows in metrics.csv, exit after summary.json."""

from __future__ import annotations

import csv
from pathlib import Path

import cnntrain
from cnntrain.cli import main
from cnntrain.watch import watch
from tests.helpers import tiny


def test_watch_scores_each_checkpoint_once_and_stops(tmp_path: Path, capsys) -> None:
    run = cnntrain.train(tiny(tmp_path / "run", epochs=3, keep_last=5)).run_dir
    (run / "checkpoints" / "step-00000099.pt").write_bytes(b"half written")  # no manifest: never scored
    scored = watch(run, poll=0.01)
    assert [step for step, _ in scored] == [8, 16, 24]
    final = cnntrain.evaluate(run)
    assert scored[-1][1].top1 == final.top1 and scored[-1][1].count == final.count
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "eval"]
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    assert main(["eval", "--watch", str(run), "--poll", "0.01"]) == 0
    assert capsys.readouterr().out.count("top-1") == 3

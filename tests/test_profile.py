"""``--profile phases|ops``: the tables printed at the end and the files in ``<run_dir>/profile``,
on tiny single-process runs; and profiling off costs nothing."""

from __future__ import annotations

import json
import logging

import torch

import cnntrain
from cnntrain.cli import main
from cnntrain.engine.profile import OFF, PHASES, make_profiler
from tests.helpers import cli_args, tiny


def test_phases_table_and_files(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cnntrain")
    result = cnntrain.train(tiny(tmp_path / "run", profile="phases", max_steps=6))
    folder = tmp_path / "run" / "profile"
    table = (folder / "profile.txt").read_text()
    assert table.startswith("phase times over 5 steps (after 1 warm-up step)")
    rows = {line.split()[0]: float(line.split()[1]) for line in table.splitlines()[2:]}
    assert list(rows) == [*PHASES, "total"]
    assert rows["forward"] > 0 and rows["backward"] > 0 and rows["optimizer"] > 0
    assert abs(rows["total"] - sum(rows[p] for p in PHASES)) < 0.05  # rounding of the printed figures
    saved = json.loads((folder / "phases.json").read_text())
    assert saved["steps"] == 5 and set(saved["ms_per_step"]) == set(PHASES)
    assert result.summary["profile_ms_per_step"] == saved["ms_per_step"]
    assert table.strip() in caplog.text  # printed at the end


def test_ops_table_trace_and_cli(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cnntrain")
    assert main(["train", *cli_args(tiny(tmp_path / "run", profile="ops", max_steps=8))]) == 0
    folder = tmp_path / "run" / "profile"
    table = (folder / "profile.txt").read_text()
    assert table.startswith("operators over 5 profiled steps, sorted by self_cpu_time_total")
    assert "aten::convolution_backward" in table and "## backward ##" in table
    assert table.strip() in caplog.text
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {f"## {p} ##" for p in PHASES} <= names and "aten::conv2d" in names
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert len(steps) == 5  # the bounded window only, so the trace stays small


def test_a_run_shorter_than_the_ops_window_still_writes_what_it_recorded(tmp_path):
    cnntrain.train(tiny(tmp_path / "run", profile="ops", max_steps=2))
    assert "operators over" in (tmp_path / "run" / "profile" / "profile.txt").read_text()
    assert (tmp_path / "run" / "profile" / "trace.json").stat().st_size > 0


def test_profiling_off_is_one_shared_no_op(tmp_path):
    prof = make_profiler("none", tmp_path / "profile", torch.device("cpu"), 10)
    assert prof is OFF and prof.phase("forward") is prof.phase("backward")
    with prof.phase("forward"):
        pass
    prof.step()
    assert prof.finish() == {} and not (tmp_path / "profile").exists()

"""benchmarks/gpu_suite.py in --tiny mode on the CPU: every part runs (or says why not), and the table
and the JSON carry every field the GPU run will fill."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_deadline_skips_what_would_not_fit_and_learns_from_what_ran():
    suite = _suite()
    deadline = suite.Deadline(300)
    deadline.started -= 150  # 150 s left
    assert deadline.allows("compile", tiny=False) and not deadline.allows("ddp", tiny=False)
    deadline.took("compile", 130)  # the first compiled row took longer than planned: plan with 1.2 x that
    assert not deadline.allows("compile", tiny=False) and deadline.allows("compile", tiny=True)
    assert deadline.skipped() == "skipped: would pass the --deadline of 300 s"


@pytest.mark.slow
def test_tiny_suite_prints_the_table_and_writes_every_json_field(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--threads", "2",
                          "--json", str(tmp_path / "suite.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    assert report["tiny"] and report["device"] == "cpu" and report["seconds"] > 0
    assert report["precision_auto"]["precision"] in ("fp32", "bf16") and report["precision_auto"]["reason"]

    rows = report["throughput"]
    assert [(r["precision"], r["channels_last"], r["compile"]) for r in rows] == [
        ("fp32", True, False), ("fp32", False, False), ("bf16", True, False), ("bf16", False, False),
        ("fp16", True, False), ("fp16", False, False), ("fp32", True, True), ("bf16", True, True),
        ("fp16", True, True)]
    for row in rows:
        assert {"model", "image_size", "batch_size", "img_per_s", "img_per_s_stderr", "peak_memory_mb",
                "status"} <= set(row)
        if row["compile"]:
            assert row["status"].startswith("skipped: --tiny")
        else:
            assert row["status"] == "ok" and row["img_per_s"] > 0 and row["model"] == "resnet50"

    cifar = report["cifar10_fast"]
    assert cifar["status"] == "ok" and cifar["recipe"] == "cifar10-fast"
    assert (cifar["train_images"], cifar["held_out"]) == (240, 60) and len(cifar["curve"]) == 2
    assert set(cifar["seconds_to"]) == {"85", "90", "91", "92", "93", "94"} and 0 <= cifar["best_top1"] <= 100
    assert cifar["load_decoded_s"] >= 0 and cifar["load_cached_s"] >= 0
    assert cifar["precision"] in ("fp32", "bf16")  # the recipe's auto, resolved for this CPU

    decode = report["jpeg_decode"]
    assert decode["status"] == "ok" and decode["host_img_per_s"] > 0 and decode["device_img_per_s"] > 0
    assert decode["device_over_host"] > 0

    assert report["ddp"]["status"] == "skipped: needs 2 CUDA devices, found 0"

    table = out.stdout
    for heading in ("precision auto ->", "throughput: resnet50", "cifar10_fast:", "folder load:", "jpeg_decode:",
                    "ddp:", "skipped: needs 2 CUDA devices"):
        assert heading in table, heading

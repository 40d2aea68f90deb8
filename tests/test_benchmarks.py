"""The start-up and evaluation benchmarks run (tiny modes), so their figures can be re-measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_startup_benchmark_times_a_cold_and_a_cached_run(capsys, tmp_path):
    figures = _load("startup").main(["--tiny", "--cold", "--json", str(tmp_path / "s.json")])
    assert figures["cold_s"] > 0
    (code,) = figures["codes"].values()
    assert code["warm_median_s"] > 0 and code["import_median_s"] > 0
    table = capsys.readouterr().out
    assert "first (cache empty)" in table and "next (cache mapped)" in table
    assert (tmp_path / "s.json").is_file()


def test_eval_fold_benchmark_prints_both_speeds_and_the_difference(capsys):
    _load("eval_fold").main(["--tiny"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet20 |")]
    assert len(row) == 1 and row[0].count("|") == 7
    assert float(row[0].split("|")[-2]) < 1e-4  # the folded model's logits equal the trained one's

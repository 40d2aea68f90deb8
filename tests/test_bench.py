"""``cnntrain bench``: the phase split, the error bar, JSON, and the data-only mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnntrain.bench import PHASES, bench
from cnntrain.cli import main
from cnntrain.errors import ConfigError
from tests.test_streaming import write_mixed_folder


def test_synthetic_bench_reports_rate_error_and_phases() -> None:
    result = bench("resnet20", batch_size=4, steps=3, warmup=1, device="cpu")
    assert result.img_per_s > 0 and result.img_per_s_stderr >= 0 and result.steps == 3
    assert list(result.phase_ms) == list(PHASES) and all(v >= 0 for v in result.phase_ms.values())
    assert result.phase_ms["forward"] > 0 and result.phase_ms["backward"] > 0
    assert result.peak_memory_mb > 0
    text = result.describe()
    assert "img/s (+- s.e.)" in text and "forward" in text and "peak memory" in text


def test_cli_json(capsys) -> None:
    assert main(["bench", "--model", "lenet", "--synthetic", "-b", "4", "--steps", "2", "--warmup", "1",
                 "--precision", "bf16", "--json", "-c", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "lenet" and data["precision"] == "bf16" and set(data["phase_ms"]) == set(PHASES)


def test_data_only_measures_decoded_images(tmp_path: Path, capsys) -> None:
    photos = write_mixed_folder(tmp_path / "photos")
    assert main(["bench", "--data-only", "--data-dir", str(photos), "-b", "4", "--steps", "3", "--warmup", "1",
                 "--image-size", "32", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "input pipeline only" in out and "img/s" in out


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="--steps"):
        bench("resnet20", steps=1)
    with pytest.raises(ConfigError, match="--data-dir"):
        bench("resnet20", data_only=True, steps=2)


def test_compile_runs_the_model_through_torch_compile(monkeypatch) -> None:
    compiled = []

    def fake_compile(model, **kwargs):  # the wiring, without minutes of compilation on a CPU
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = bench("lenet", batch_size=2, steps=2, warmup=1, device="cpu", compile=True, channels_last=False)
    assert len(compiled) == 1 and result.compiled and not result.channels_last
    assert "lenet fp32, compiled" in result.describe()
    assert not bench("lenet", batch_size=2, steps=2, warmup=1, device="cpu").compiled and len(compiled) == 1

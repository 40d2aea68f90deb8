"""``--precision auto``: what each device gets, the loss-scale rule, and a run that only ever sees the
resolved precision (in its log line, config.yaml, checkpoints and summary), also under async-ps."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import yaml

import cnntrain
from cnntrain import hardware
from cnntrain.bench import bench
from cnntrain.config import build_config
from cnntrain.engine import checkpoint as ckpt
from cnntrain.errors import ConfigError
from cnntrain.hardware import cpu_bf16_feature, resolve_precision, with_resolved_precision
from tests.helpers import tiny
from tests.test_async_ps import _cluster_options, _run_in_threads

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
INTEL_SPR = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _cpu(monkeypatch, feature: str | None, speedup: float = 1.6) -> None:
    """A CPU with ``feature`` (or none) on which a bf16 convolution step runs ``speedup`` x fp32's speed."""
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: feature)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)


def _gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_cpu_bf16_is_read_from_the_cpuinfo_flags():
    assert cpu_bf16_feature(INTEL_SPR) == "AMX-BF16"
    assert cpu_bf16_feature("flags\t: avx2 avx512f avx512_bf16\n") == "AVX512-BF16"
    assert cpu_bf16_feature("flags\t: avx2 avx512f avx512bw\n") is None  # AVX512 alone emulates bf16
    assert cpu_bf16_feature("Features\t: fp asimd\n") is None
    assert cpu_bf16_feature("") is None


@pytest.mark.parametrize("feature, expected", [("AVX512-BF16", "bf16"), ("AMX-BF16", "bf16"), (None, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, feature, expected):
    _cpu(monkeypatch, feature)
    precision, reason = resolve_precision("auto", CPU)
    assert precision == expected
    assert (feature or "neither AVX512-BF16 nor AMX") in reason


@pytest.mark.parametrize("speedup, expected", [(1.6, "bf16"), (1.1, "bf16"), (0.76, "fp32")])
def test_auto_on_a_bf16_cpu_takes_bf16_only_where_it_measures_faster(monkeypatch, speedup, expected):
    """Some AVX512-BF16 CPUs run bf16 convolutions slower than fp32 ones: auto measures instead of
    trusting the flag."""
    _cpu(monkeypatch, "AVX512-BF16", speedup)
    precision, reason = resolve_precision("auto", CPU)
    assert precision == expected and f"{speedup:.2f}x" in reason


def test_the_cpu_bf16_probe_times_both_precisions_quickly():
    hardware.cpu_bf16_speedup.cache_clear()
    threads = torch.get_num_threads()
    started = time.perf_counter()
    speedup = hardware.cpu_bf16_speedup()
    assert 0.05 < speedup < 20 and time.perf_counter() - started < 10
    assert torch.get_num_threads() == threads  # it times one core, then gives the run its threads back
    assert hardware.cpu_bf16_speedup() == speedup  # measured once per process


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    _gpu(monkeypatch, capability)
    precision, reason = resolve_precision("auto", GPU)
    assert precision == expected and f"compute capability {capability[0]}.{capability[1]}" in reason


@pytest.mark.parametrize("given", ["fp32", "fp16", "bf16"])
def test_a_given_precision_is_kept_on_any_device(monkeypatch, given):
    _cpu(monkeypatch, None)
    assert resolve_precision(given, CPU) == (given, "as asked")
    cfg = build_config(precision=given)
    assert with_resolved_precision(cfg, CPU) is cfg


def test_auto_is_the_default_and_recipes_keep_their_own():
    assert build_config().precision == "auto"
    assert build_config("cifar10-fast").precision == "auto"  # bf16 where that is fast, as the recipe wants
    assert build_config("nvcnn-inception3").precision == "fp16"


def test_loss_scale_with_auto_only_where_auto_picks_fp16(monkeypatch):
    cfg = build_config(loss_scale=128)  # allowed when built: the device decides
    _gpu(monkeypatch, (7, 5))
    fp16 = with_resolved_precision(cfg, GPU)
    assert (fp16.precision, fp16.loss_scale) == ("fp16", 128)
    _cpu(monkeypatch, "AVX512-BF16")
    with pytest.raises(ConfigError, match="--loss-scale 128 applies to fp16 only, and --precision auto chose bf16"):
        with_resolved_precision(cfg, CPU)
    with pytest.raises(ConfigError, match="--loss-scale applies to --precision fp16 only, not bf16"):
        build_config(loss_scale=128, precision="bf16")


def test_auto_avoids_fp16_under_sparse_gradient_exchange(monkeypatch):
    _gpu(monkeypatch, (7, 0))
    cfg = with_resolved_precision(build_config(grad_compression="topk"), GPU)
    assert cfg.precision == "fp32"


@pytest.mark.parametrize("feature, expected", [("AVX512-BF16", "bf16"), (None, "fp32")])
def test_a_run_logs_and_stores_the_resolved_precision(tmp_path, monkeypatch, caplog, feature, expected):
    _cpu(monkeypatch, feature)
    options = tiny(tmp_path / "run", precision="auto", max_steps=4, save_every=2, epochs=1)
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        result = cnntrain.train(options)
    reason = f"CPU has {feature}" if feature else "CPU has neither AVX512-BF16 nor AMX"
    assert f"precision auto -> {expected} ({reason}" in caplog.text
    assert result.summary["precision"] == expected
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["precision"] == expected
    payload = ckpt.load_checkpoint(ckpt.latest_valid(result.run_dir / "checkpoints"))
    assert payload["config"]["precision"] == expected
    # Resuming with auto on the same machine resolves the same: nothing changed, nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        cnntrain.train({**options, "max_steps": 6, "resume": "auto"})
    assert "resumed from" in caplog.text and "changed options" not in caplog.text


def test_bench_takes_auto(monkeypatch):
    _cpu(monkeypatch, "AVX512-BF16")
    assert bench("lenet", batch_size=2, steps=2, warmup=0, precision="auto", device="cpu").precision == "bf16"
    _cpu(monkeypatch, None)
    assert bench("lenet", batch_size=2, steps=2, warmup=0, precision="auto", device="cpu").precision == "fp32"


@pytest.mark.dist
def test_async_ps_roles_agree_on_auto_and_the_chief_stores_the_resolved_one(tmp_path, monkeypatch):
    # The ps keeps "auto" (it computes nothing); the chief's HELLO must still match it.
    _cpu(monkeypatch, "AVX512-BF16")
    options = _cluster_options(tmp_path / "run", 1, precision="auto", max_steps=3, epochs=0)
    result = _run_in_threads(options, 1)
    assert result.steps == 3
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["precision"] == "bf16"

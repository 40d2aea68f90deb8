"""Every script in benchmarks/ runs here in its tiny (or otherwise cheap) mode on generated data, and
its table or JSON carries the rows and fields it promises, so none can rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads_restored():
    """Scripts run in this process set torch's thread count; the tests after these keep theirs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def test_mnist_from_test_split_writes_both_splits_in_the_official_format(capsys, tmp_path):
    from cnntrain.data.mnist import load_mnist, read_idx
    from tests.fixtures import write_mnist

    write_mnist(tmp_path / "src", n_train=4, n_test=30)
    _load("mnist_from_test_split").main([str(tmp_path / "src"), str(tmp_path / "dest"), "--train", "20"])
    assert "20 training and 10 test images" in capsys.readouterr().out
    source = read_idx(tmp_path / "src" / "t10k-images-idx3-ubyte.gz")
    train = load_mnist(tmp_path / "dest", train=True, verify=False)
    test = load_mnist(tmp_path / "dest", train=False, verify=False)
    assert (len(train), len(test)) == (20, 10)
    assert train.images.shape[1:] == (1, 28, 28) and (train.images[:, 0] == source[:20]).all()
    assert (test.images[:, 0] == source[20:]).all()


@pytest.mark.slow
def test_jpeg_decode_times_host_and_device_decoding_and_their_ratio(capsys):
    figures = _load("jpeg_decode").main(["--tiny", "--device", "cpu", "--threads", "1"])
    (host,), (device,) = figures["img_per_s"]["host"], figures["img_per_s"]["device"]
    assert host > 0 and device > 0 and figures["device_over_host"] == pytest.approx(device / host)
    table = capsys.readouterr().out
    assert f"decode on host  : {host:8.1f} img/s" in table and f"decode on device: {device:8.1f} img/s" in table
    assert f"device / host: {device / host:.2f}x" in table


@pytest.mark.slow
def test_bench_vs_train_prints_both_rows_and_their_ratio(capsys):
    result = _load("bench_vs_train").main(["--tiny", "--threads", "1"])
    (bench,), (train,) = result["runs"]["bench"], result["runs"]["train"]
    assert bench > 0 and train > 0 and result["median_img_per_s"] == {"bench": bench, "train": train}
    assert result["train_over_bench"] == pytest.approx(train / bench)
    assert json.loads(json.dumps(result)) == result  # what --json prints
    table = capsys.readouterr().out
    assert f"bench  median {bench:8.1f} img/s" in table and f"train  median {train:8.1f} img/s" in table
    assert f"train / bench = {train / bench:.3f}" in table


@pytest.mark.slow
def test_time_to_accuracy_tabulates_both_recipes_and_again_from_their_runs(capsys, tmp_path):
    module = _load("time_to_accuracy")
    module.main(["--tiny", "--out", str(tmp_path), "--targets", "0", "101", "--threads", "1"])
    trained = capsys.readouterr().out
    table = trained[trained.index("validation accuracy on 16 held-out images"):]
    assert table.splitlines()[1].split() == ["target", "resnet20", "cifar10-fast"]
    reached, never = table.splitlines()[2].split(), table.splitlines()[3].split()
    assert reached[0] == "0%" and all(cell.endswith("s") and float(cell[:-1]) >= 0 for cell in reached[1:])
    assert never == ["101%", "-", "-"]
    for name in ("resnet20", "cifar10-fast"):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"{name}: best "))
        assert "1.0 epochs" in line and not line.split()[2].startswith("nan")
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0

    module.main(["--runs", str(tmp_path / "resnet20"), str(tmp_path / "cifar10-fast"), "--out", str(tmp_path),
                 "--targets", "0", "101"])
    assert capsys.readouterr().out.strip() == table.strip()  # the same table, from the run folders alone


def test_augment_policies_prints_every_policy_for_both_sets_with_ratios(capsys):
    module = _load("augment_policies")
    medians = module.main(["--tiny"])
    assert set(medians) == {(row, kind) for row in module.ROWS for kind in ("memory", "stream")}
    assert all(rate > 0 and math.isfinite(rate) for rate in medians.values())
    out = capsys.readouterr().out
    assert "memory: 200 images of (3, 32, 32)" in out and "stream: 48 images of (3, 64, 64)" in out
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert lines.pop("policy") == [f" {'memory img/s':>14s} ", " x none ", f" {'stream img/s':>14s} ", " x none "]
    assert list(lines) == list(module.ROWS)
    for row, cells in lines.items():
        for kind, (rate, ratio) in zip(("memory", "stream"), (cells[:2], cells[2:])):
            assert float(rate) == pytest.approx(medians[row, kind], abs=0.05)
            assert float(ratio) == pytest.approx(medians[row, kind] / medians["none", kind], abs=0.005)


@pytest.mark.slow
def test_imbalance_check_reports_macro_f1_and_minority_recall_per_variant(capsys, tmp_path):
    module = _load("imbalance_check")
    # Not "plain": the same run without options, and each variant costs a fresh process.
    variants = {name: module.VARIANTS[name] for name in ("class-weights", "balanced-sampler")}
    out = module.main(["--tiny", "--variants", *variants, "--json", str(tmp_path / "imbalance.json")])
    assert json.loads((tmp_path / "imbalance.json").read_text()) == out
    assert out["counts"] == {"train": {"airplane": 12, "bird": 3, "cat": 3, "dog": 12},
                             "val": {"airplane": 4, "bird": 4, "cat": 4, "dog": 4}}
    assert list(out["results"]) == list(variants)
    printed = capsys.readouterr().out
    for name, flags in variants.items():
        r = out["results"][name]
        words = r["command"].split()
        assert words[words.index("--cache-dir") + 2:] == flags  # the variant's own options, last
        assert r["seconds"] > 0 and all(0 <= r[k] <= 1 for k in ("macro_f1", "weighted_f1", "top1", "ece"))
        assert set(r["minority_recall"]) == set(r["minority_f1"]) == {"bird", "cat"}
        assert f"{name:<17} macro F1 {100 * r['macro_f1']:.2f}%  top-1 {100 * r['top1']:.2f}%" in printed


@pytest.mark.slow
@pytest.mark.slow  # ~14 s: three fresh cnntrain processes
def test_vs_plain_pytorch_measures_every_row_and_the_ratios(capsys, tmp_path):
    # fp32 only: the bf16 rows are the same runs with another --precision, and each costs a fresh process.
    report = _load("vs_plain_pytorch").main(["--synthetic-only", "--steps", "1", "--warmup", "1", "--window", "1",
                                             "--repeats", "1", "--batch-size", "8", "--threads", "1", "--workers", "1",
                                             "--precisions", "fp32", "--json", str(tmp_path / "vs.json")])
    assert json.loads((tmp_path / "vs.json").read_text()) == report
    med = report["median_img_per_s"]
    assert set(med) == {f"synthetic | {n}" for n in ("plain fp32", "cnntrain defaults", "cnntrain fp32")} | \
        {f"in memory | {n}" for n in ("plain cl-fp32", "compute-only fp32")}
    assert all(v > 0 and math.isfinite(v) for v in med.values())
    synthetic = {k.split(" | ")[1]: v for k, v in med.items() if k.startswith("synthetic")}
    in_memory = {k.split(" | ")[1]: v for k, v in med.items() if k.startswith("in memory")}
    assert report["ratios"] == pytest.approx({
        "synthetic fp32 end-to-end / compute-only": synthetic["cnntrain fp32"] / in_memory["compute-only fp32"],
        "synthetic defaults / plain loop": synthetic["cnntrain defaults"] / synthetic["plain fp32"],
        "synthetic defaults / plain channels_last fp32 compute":
            synthetic["cnntrain defaults"] / in_memory["plain cl-fp32"]})
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert table[1].split() == ["data", "loop", "img/s", "vs", "plain", "one-time", "s"] and len(table) == 2 + 5
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in table[2:] if line.startswith("synthetic")}
    assert rows["synthetic plain fp32"][1] == "1.00x"
    assert rows["synthetic cnntrain fp32"][1] == f"{synthetic['cnntrain fp32'] / synthetic['plain fp32']:.2f}x"
    assert float(rows["synthetic cnntrain defaults"][2]) > 0  # the one-time cost: start-up of the fresh process


@pytest.mark.slow
@pytest.mark.dist
def test_async_vs_sync_runs_both_strategies_and_tabulates_them(capsys, tmp_path):
    results = _load("async_vs_sync").main(["--tiny", "--target", "0", "--json", str(tmp_path / "avs.json")])
    assert json.loads((tmp_path / "avs.json").read_text()).keys() == {"args", "sync", "async"}
    s, a = results["sync"], results["async"]
    assert s["updates"] == 4 and a["updates"] > 0  # 64 images, 16 per update, one epoch
    for r in (s, a):
        assert r["updates_per_s"] == pytest.approx(r["updates"] / r["train_s"]) and r["img_per_s"] > 0
        assert r["time_to_target_s"] >= 0 and r["evaluations"] >= 1  # every evaluation reaches 0%
        assert 0 <= r["final_top1"] <= 1 and r["wall_s"] > r["train_s"]
    assert s["staleness"] is None and sum(a["staleness"]) == a["updates"]
    assert set(a["per_worker_updates_per_s"]) == {"chief", "worker 1"}
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["sync", "DDP", "(2", "x", "8)", "async-ps", "(1", "ps,", "2", "x", "16)"]
    assert [line[:28].strip() for line in table[2:9]] == [
        "updates", "updates/s", "img/s", "time to 0% top-1 (s)", "final top-1", "training time (s)",
        "wall time incl. start-up (s)"]
    assert "not reached" not in "\n".join(table)


@pytest.mark.slow
@pytest.mark.slow  # ~30 s: five ResNet-18 runs in fresh processes
def test_transfer_check_compares_both_starts_and_times_frozen_against_full(capsys, tmp_path):
    figures = _load("transfer_check").main(["--tiny", "--out", str(tmp_path)])
    assert len(figures["from_cifar_top1"]) == len(figures["from_random_top1"]) == 1
    assert all(0 <= a <= 100 for a in figures["from_cifar_top1"] + figures["from_random_top1"])
    frozen, full = figures["frozen_s_per_epoch"], figures["full_s_per_epoch"]
    assert frozen > 0 and full > 0
    out = capsys.readouterr().out
    assert "CIFAR-10 subset (144 images, 32 px, 1 epochs): held-out top-1" in out
    assert "--init-from " + str(tmp_path / "cifar-resnet18") in out  # the fine-tuning starts from the pre-training
    (cifar,), (scratch,) = figures["from_cifar_top1"], figures["from_random_top1"]
    assert f"from CIFAR-10 weights {cifar:.1f}%" in out and f"{cifar - scratch:+.1f} points" in out
    assert f"--freeze backbone {frozen:.2f}, full fine-tuning {full:.2f}: {full / frozen:.2f}x faster frozen" in out


@pytest.mark.slow
@pytest.mark.dist
def test_ddp_scaling_on_loopback_prints_efficiency_overlap_gain_and_bytes(capsys, tmp_path):
    # Loopback only (--rates with no rate): the veth rows need root and add two 2-process runs.
    info = _load("ddp_scaling").main(["--tiny", "--rates", "--json", str(tmp_path / "ddp.json")])
    assert json.loads((tmp_path / "ddp.json").read_text())["rows"] == info["rows"]
    rows = {r["setting"]: r for r in info["rows"]}
    assert list(rows) == ["1 process", "2 processes loopback overlap", "2 processes loopback no-overlap"]
    single = rows["1 process"]["img_per_s"]
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["scaling_efficiency"] == pytest.approx(r["img_per_s"] / (r["procs"] * single))
        assert 0 <= r["final_top1"] <= 1
    overlap, plain = rows["2 processes loopback overlap"], rows["2 processes loopback no-overlap"]
    for r in (overlap, plain):
        assert r["bytes_per_step"] > 0 and r["dense_bytes_per_step"] == pytest.approx(r["bytes_per_step"])
    table = {line[:34].strip(): line[34:].split() for line in capsys.readouterr().out.splitlines()
             if line[:34].strip() in rows}
    assert table["2 processes loopback overlap"][2] == f"{overlap['img_per_s'] / plain['img_per_s']:.2f}"
    assert table["2 processes loopback no-overlap"][2:] == [f"{plain['bytes_per_step'] / 1e3:.1f}", "1.0x"]

"""Checks that must run inside a real multi-process group; ``test_dist_launch.py`` starts one
process per rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set:

    python -m tests.dist_tasks OUT_JSON

Rank 0 writes what it measured to OUT_JSON; the test asserts on it.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist


def gather_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (equal sizes), in rank order."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def shard_report() -> dict:
    """How often each training image is visited per epoch across the ranks of a real group."""
    from cnntrain.data.base import ArrayDataset
    from cnntrain.data.pipeline import DeviceLoader

    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for size, batch in ((256, 16), (250, 16), (101, 8)):  # full batches, partial last batch, odd size
        data = ArrayDataset(torch.zeros(size, 1, 4, 4, dtype=torch.uint8), torch.zeros(size, dtype=torch.long))
        loader = DeviceLoader(data, batch, device=torch.device("cpu"), mean=[0.0], std=[1.0], shuffle=True,
                              seed=3, rank=rank, world_size=world)
        for epoch in (0, 1):
            mine = loader.epoch_indices(epoch)
            sizes = gather_list(torch.tensor([mine.numel()]))
            longest = int(max(s.item() for s in sizes))
            padded = torch.full((longest,), -1, dtype=torch.long)
            padded[: mine.numel()] = mine
            visits = torch.cat(gather_list(padded))
            counts = torch.bincount(visits[visits >= 0], minlength=size)
            report[f"{size}/{batch}/e{epoch}"] = {"min": int(counts.min()), "max": int(counts.max()),
                                                  "steps": len(loader)}
    return report


def compression_report() -> dict:
    """Train a small CNN a few DDP steps with each gradient compression: are the ranks' weights
    still identical, and how far is each from uncompressed training?"""
    from cnntrain.config import build_config
    from cnntrain.models.registry import create_model_for
    from cnntrain.parallel.env import detect_launch
    from cnntrain.parallel.strategy import make_strategy

    rank = dist.get_rank()
    results = {}
    reference = None
    for compression in ("none", "fp16", "bf16", "powersgd", "none-no-overlap"):
        overlap = compression != "none-no-overlap"
        cfg = build_config(dataset="synthetic", model="lenet", threads=1, overlap=overlap, bucket_mb=0.01,
                           grad_compression=compression if overlap else "none")
        strategy = make_strategy(cfg, detect_launch())
        strategy.backend = "gloo"
        torch.manual_seed(100 + rank)  # different start per rank: wrapping must make them equal
        model = create_model_for("lenet", 10, (1, 28, 28))
        wrapped = strategy.wrap_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7 + rank)
        for _ in range(14):  # PowerSGD compresses from step 10 on
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
            strategy.after_backward(list(model.parameters()))
            opt.step()
            opt.zero_grad()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        ranks = gather_list(flat)
        if reference is None:
            reference = flat
        results[compression] = {
            "ranks_equal": all(torch.equal(ranks[0], r) for r in ranks[1:]),
            "rel_diff_to_none": float((flat - reference).norm() / reference.norm()),
            "buckets": len(wrapped._get_ddp_logging_data()["rebuilt_bucket_sizes"].split(","))
            if overlap else 0,
        }
        # DDP objects alive at destroy_process_group make gloo abort at exit (torch 2.14).
        strategy.release()
        del wrapped
    gc.collect()
    return results


def precision_report() -> dict:
    """--precision auto in a real group whose ranks time bf16 differently (as two busy ranks can):
    what each rank runs, and what happens when rank 0 refuses its own choice."""
    from cnntrain import hardware
    from cnntrain.config import build_config
    from cnntrain.errors import ConfigError
    from cnntrain.parallel.env import detect_launch
    from cnntrain.parallel.strategy import make_strategy

    rank = dist.get_rank()
    hardware.cpu_bf16_feature = lambda cpuinfo=None: "AVX512-BF16"
    hardware.cpu_bf16_speedup = lambda: 2.0 if rank == 0 else 0.5  # rank 0 takes bf16, rank 1 alone fp32
    launch = detect_launch()
    chosen = hardware.agree_on_precision(build_config(device="cpu"), make_strategy(build_config(device="cpu"), launch))
    codes = gather_list(torch.tensor([hardware.PRECISIONS.index(chosen.precision)]))
    try:  # --loss-scale wants fp16: every rank's choice refuses it, and every rank says so
        hardware.agree_on_precision(build_config(device="cpu", loss_scale=128),
                                    make_strategy(build_config(device="cpu"), launch))
        refused = 0
    except ConfigError:
        refused = 1
    return {"precisions": [hardware.PRECISIONS[int(c)] for c in codes],
            "refused_on_ranks": int(sum(gather_list(torch.tensor([refused]))).item())}


def report_from_every_rank(out_path: str, make_report) -> None:
    """Join the gloo group the launcher's environment describes, run ``make_report()`` on every rank
    (it may use collectives) and write rank 0's result to ``out_path`` as JSON."""
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    try:
        report = make_report()
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(report, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_without_finalizing() -> None:
    """End a rank whose report is written and whose group is destroyed, skipping interpreter
    finalization: after a group that ran DDP with Python comm hooks, torch 2.14's gloo now and then
    aborts there ("terminate called without an active exception", SIGABRT) with all work done,
    which would fail a check that passed. An error before this point still ends the rank non-zero."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    report_from_every_rank(out_path, lambda: {"shards": shard_report(), "compression": compression_report(),
                                              "precision": precision_report()})


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_finalizing()

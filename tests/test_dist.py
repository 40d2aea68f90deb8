"""In-process tests of the distributed pieces: launcher flags, launch detection, option checks,
error classification, resume after an elastic restart, coalesced all-reduce. No extra processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cnntrain.cli import main
from cnntrain.config import build_config
from cnntrain.engine import checkpoint as ckpt
from cnntrain.errors import ConfigError
from cnntrain.models.registry import create_model_for
from cnntrain.parallel.ddp import DDP, AllReduceAfterBackward, SparseDDP, is_collective_failure
from cnntrain.parallel.env import LaunchEnv, detect_launch
from cnntrain.parallel.hooks import all_reduce_mean, broadcast_state, bucket_mb_for
from cnntrain.parallel.launch import strip_launch_flags, torchrun_argv
from cnntrain.parallel.partial import PartialUpdate
from cnntrain.parallel.strategy import SingleProcess, make_strategy, resume_for_restart
from tests.helpers import cli_args, tiny


def test_launcher_flags_are_stripped_from_the_workers_command():
    argv = ["--debug", "train", "--nproc-per-node", "2", "--max-restarts=1", "-b", "16", "--master-port", "1234",
            "--nnodes", "1", "--run-dir", "r"]
    assert strip_launch_flags(argv) == ["--debug", "train", "-b", "16", "--run-dir", "r"]


def test_one_node_uses_a_standalone_rendezvous_and_several_nodes_the_master():
    one = torchrun_argv(["train"], nproc=2, max_restarts=1)
    assert one == ["--nproc-per-node", "2", "--max-restarts", "1", "--standalone", "-m", "cnntrain", "train"]
    two = torchrun_argv(["train"], nproc=1, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    assert two[two.index("--master-addr") + 1] == "10.0.0.1" and two[two.index("--node-rank") + 1] == "1"
    with pytest.raises(ConfigError, match="--node-rank 2"):
        torchrun_argv(["train"], nproc=1, nnodes=2, node_rank=2)


def test_nproc_per_node_inside_a_launched_job_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main(["train", "--nproc-per-node", "2", *cli_args(tiny(tmp_path / "r"))]) == 2
    assert "drop one launcher" in capsys.readouterr().err


def test_open_mpi_variables_and_master_flags():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "1111"}
    launch = detect_launch(env, master_addr="10.1.2.3")
    assert (launch.rank, launch.world_size, launch.launcher) == (1, 2, "openmpi")
    assert (launch.master_addr, launch.master_port) == ("10.1.2.3", 1111)


@pytest.mark.parametrize("options, message", [
    ({"grad_compression": "powersgd", "overlap": False}, "needs --overlap"),
    ({"sync_bn": True}, "--sync-bn needs CUDA"),
])
def test_impossible_options_fail_before_any_rendezvous(options, message):
    with pytest.raises(ConfigError, match=message):
        cfg = build_config(dataset="synthetic", device="cpu", **options)
        make_strategy(cfg, LaunchEnv(rank=0, world_size=2, master_port=1)).setup()  # port 1: would fail to join


@pytest.mark.parametrize("options, kind", [
    ({}, DDP), ({"grad_compression": "fp16"}, DDP), ({"grad_compression": "topk"}, SparseDDP),
    ({"grad_compression": "threshold", "compression_threshold": 0.1}, SparseDDP),
    ({"overlap": False}, AllReduceAfterBackward), ({"partial_update": True}, PartialUpdate),
])
def test_one_strategy_class_per_exchange_mode(options, kind):
    cfg = build_config(dataset="synthetic", device="cpu", **options)
    assert type(make_strategy(cfg, LaunchEnv(rank=0, world_size=2))) is kind
    assert type(make_strategy(cfg, LaunchEnv())) is SingleProcess


def test_powersgd_on_gloo_gets_one_bucket_for_all_gradients():
    model = create_model_for("lenet", 10, (1, 28, 28))  # 61706 float32 parameters, 0.24 MB
    assert bucket_mb_for(model, "powersgd", "gloo", 0.01) == pytest.approx(61706 * 4 / 2**20 + 1)
    assert bucket_mb_for(model, "powersgd", "nccl", 0.01) == 0.01
    assert bucket_mb_for(model, "fp16", "gloo", 0.01) == 0.01


def test_collective_failures_are_recognised_and_others_are_not():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Connection reset by peer"))
    assert is_collective_failure(dist.DistBackendError("anything"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("connection"))


def test_an_elastic_restart_resumes_only_when_a_checkpoint_exists(tmp_path, monkeypatch):
    cfg = build_config(**tiny(tmp_path / "run"))
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert resume_for_restart(cfg, main=True).resume == ""  # nothing saved yet: a fresh start
    ckpt.save_checkpoint({"step": 3}, tmp_path / "run" / "checkpoints", 3)
    restarted = resume_for_restart(cfg, main=True)
    assert restarted.resume == "auto" and cfg.resume == ""  # a new config; the given one is unchanged
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert resume_for_restart(cfg, main=True).resume == ""  # restarts off: never resume behind the user's back


def test_coalesced_all_reduce_averages_and_compresses_in_place(one_rank_group):
    grads = [torch.tensor([1.0, 1 + 2**-12]), torch.tensor([[3.0]]), torch.tensor([2.0], dtype=torch.float64)]
    all_reduce_mean(grads, world_size=1)
    assert grads[0].tolist() == [1.0, 1 + 2**-12] and grads[2].dtype == torch.float64
    all_reduce_mean(grads, world_size=1, compression="fp16")
    assert grads[0].tolist() == [1.0, 1.0]  # 1 + 2^-12 is not an fp16 number: proof it went on the wire as fp16
    model = torch.nn.BatchNorm2d(3)
    broadcast_state(model)
    assert torch.equal(model.running_var, torch.ones(3))


def test_a_failed_collective_becomes_one_error_naming_rank_and_operation():
    from cnntrain.errors import DistributedError

    strategy = DDP(build_config(dataset="synthetic", dist_timeout=7), LaunchEnv(rank=1, world_size=2))
    with pytest.raises(DistributedError, match=r"rank 1 of 2: all-reduce of metrics failed .*Connection reset.*7 s"), \
            strategy.guard(), strategy.collective("all-reduce of metrics"):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    with pytest.raises(ZeroDivisionError), strategy.guard():
        raise ZeroDivisionError  # not a collective: left alone
    strategy.teardown()  # no process group: nothing to do, no barrier attempted

import errno
import logging
import os
import subprocess
import sys

import pytest
import torch

from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.run import claim_run_dir
from cnntrain.errors import CheckpointError, ConfigError
from tests.helpers import REPO


def _state(v):
    return {"model": {"w": torch.full((4,), float(v))}, "step": v, "config": {"lr": 0.1}}


def test_save_writes_checkpoint_and_manifest_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "step-00000004.json").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "no temp files left behind"
    assert ckpt.load_checkpoint(tmp_path / "step-00000004.pt")["step"] == 4


def test_best_copy_is_verified_too(tmp_path):
    ckpt.save_checkpoint(_state(7), tmp_path, 7, best=True)
    ckpt.verify_checkpoint(tmp_path / "best.pt")
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["step"] == 7


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    ckpt.save_checkpoint(_state(1), tmp_path, 1)
    newest = ckpt.save_checkpoint(_state(2), tmp_path, 2)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
        newest.write_bytes(bytes(data))
    else:
        ckpt.manifest_path(newest).unlink()
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        found = ckpt.latest_valid(tmp_path)
    assert found == tmp_path / "step-00000001.pt"
    assert "step-00000002.pt" in caplog.text
    with pytest.raises(CheckpointError, match="step-00000002.pt"):
        ckpt.verify_checkpoint(newest)


def test_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(_state(1), tmp_path, 1)
    before = good.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left.*step-00000001.pt is intact"):
        ckpt.save_checkpoint(_state(2), tmp_path, 2)
    assert good.read_bytes() == before
    assert ckpt.latest_valid(tmp_path) == good
    assert not (tmp_path / "step-00000002.pt").exists()


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_resume_auto_with_no_checkpoint_starts_fresh(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def _pair_of(folder, run_id):
    return [s for s, p in ckpt.list_checkpoints(folder) if ckpt.run_id_of(p) == run_id]


def test_pruning_counts_only_valid_checkpoints_of_this_run(tmp_path):
    old = ckpt.new_run_id()
    for step in (50, 60):  # an earlier run's, at higher steps
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=5, run_id=old)
    (tmp_path / "step-00000099.pt").write_bytes(b"leftover without a manifest")
    run = ckpt.new_run_id()
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=1, run_id=run)
        assert path.is_file() and ckpt.latest_valid(tmp_path, quiet=True) is not None
    assert _pair_of(tmp_path, run) == [3], "the newest valid one of this run stays"
    assert _pair_of(tmp_path, old) == [50, 60], "another run's checkpoints are not touched"
    assert (tmp_path / "step-00000099.pt").is_file(), "nor a leftover"
    ckpt.verify_checkpoint(tmp_path / "step-00000003.pt")


def test_keep_last_1_with_a_manifestless_leftover_above_keeps_a_valid_checkpoint(tmp_path):
    run = ckpt.new_run_id()
    (tmp_path / "step-00000100.pt").write_bytes(b"half written")
    for step in (1, 2):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=1, run_id=run)
    assert ckpt.latest_valid(tmp_path, quiet=True) == tmp_path / "step-00000002.pt"
    assert ckpt.run_id_of(tmp_path / "step-00000002.pt") == run


def test_damaged_checkpoints_of_this_run_do_not_count_as_kept(tmp_path):
    run = ckpt.new_run_id()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=5, run_id=run)
    (tmp_path / "step-00000002.pt").write_bytes(b"bit rot")
    ckpt.prune(tmp_path, 2, run)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]  # 3 and the next valid one, 1


def test_prune_protects_what_the_evaluator_has_not_scored(tmp_path):
    run = ckpt.new_run_id()
    for step in range(1, 7):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=0, run_id=run)
    scored = 2
    deleted = ckpt.prune(tmp_path, 2, run, protect=lambda step: scored is not None and step > scored)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5, 6]
    assert [p.name for p in deleted] == ["step-00000002.pt", "step-00000001.pt"]


def test_a_run_resumed_from_an_older_checkpoint_keeps_what_it_just_wrote(tmp_path):
    run = ckpt.new_run_id()
    for step in (10, 20):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep_last=1, run_id=run)
    # resumed from step 10 (say), it writes step 15: neither 15 nor the later 20 is deleted
    ckpt.save_checkpoint(_state(15), tmp_path, 15, keep_last=1, run_id=run)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20]


def test_temp_files_of_other_runs_are_never_removed(tmp_path):
    mine, other = ckpt.new_run_id(), ckpt.new_run_id()
    theirs = tmp_path / f".step-00000009.pt.tmp-{os.getpid() + 1}-{other}-0123abcd"
    dead_mine = tmp_path / f".step-00000008.pt.tmp-{os.getpid() + 1}-{mine}-0123abcd"
    for leftover in (theirs, dead_mine):
        leftover.write_bytes(b"partial")
    ckpt.save_checkpoint(_state(1), tmp_path, 1, keep_last=2, run_id=mine)
    assert theirs.is_file(), "another run may be writing it right now"
    assert not dead_mine.exists(), "an earlier process of this run left it"


def test_resume_auto_with_only_damaged_checkpoints_names_each_and_why(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(_state(1), folder, 1)
    ckpt.save_checkpoint(_state(2), folder, 2)
    (folder / "step-00000001.pt").write_bytes(b"bit rot")
    ckpt.manifest_path(folder / "step-00000002.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_resume("auto", tmp_path)
    message = str(err.value)
    assert "--resume auto" in message and str(folder) in message
    assert "step-00000002.pt has no manifest" in message and "step-00000001.pt is 7 bytes" in message
    assert "--overwrite" in message
    with pytest.raises(CheckpointError, match="step-00000002.pt has no manifest"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)


def test_fresh_run_refuses_a_folder_with_checkpoints_unless_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(_state(8), run_dir / "checkpoints", 8, best=True, run_id=ckpt.new_run_id())
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        claim_run_dir(run_dir, resuming=False, overwrite=False)
    message = str(err.value)
    assert str(run_dir) in message and "--resume auto" in message and "--overwrite" in message
    assert "step-00000008.pt" in message
    assert ckpt.list_checkpoints(run_dir / "checkpoints"), "nothing deleted"
    with claim_run_dir(run_dir, resuming=True, overwrite=False):
        assert ckpt.list_checkpoints(run_dir / "checkpoints")
    with claim_run_dir(run_dir, resuming=False, overwrite=True) as lock:
        assert lock.held
        assert not list((run_dir / "checkpoints").iterdir()) and not (run_dir / "summary.json").exists()
    assert not lock.held
    with claim_run_dir(tmp_path / "new", resuming=False, overwrite=False):
        assert (tmp_path / "new").is_dir()


def test_an_unfinished_first_write_does_not_block_a_fresh_start(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000008.pt").write_bytes(b"killed before its manifest")
    claim_run_dir(tmp_path, resuming=False, overwrite=False).release()


HOLD = """
import sys, time
from pathlib import Path
from cnntrain.engine.run import claim_run_dir
lock = claim_run_dir(Path(sys.argv[1]), resuming=False, overwrite=False)
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_second_run_in_the_same_folder_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ConfigError, match=rf"{run_dir} is in use by another run \(pid {holder.pid} on "):
            claim_run_dir(run_dir, resuming=True, overwrite=False)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # Killed without releasing: the lock died with it; the file it left does not block.
    assert (run_dir / ".lock").is_file()
    claim_run_dir(run_dir, resuming=True, overwrite=False).release()


def test_the_claim_is_released_on_an_exception_and_blocks_a_second_claim_meanwhile(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), claim_run_dir(tmp_path, resuming=False, overwrite=False):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on"):
            claim_run_dir(tmp_path, resuming=False, overwrite=False)
        raise RuntimeError("boom")
    lock = claim_run_dir(tmp_path, resuming=False, overwrite=False)
    lock.release()
    lock.release()  # idempotent

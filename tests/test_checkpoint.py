import errno
import logging

import pytest
import torch

from cnntrain.engine import checkpoint as ckpt
from cnntrain.errors import CheckpointError


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

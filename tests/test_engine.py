import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import cnntrain
from cnntrain.engine import checkpoint as ckpt
from cnntrain.errors import ConfigError, NumericalError
from tests.helpers import REPO, cli_args, metrics_rows, same_weights, tiny, weights


def test_end_to_end_run_writes_every_output(tmp_path):
    result = cnntrain.train(tiny(tmp_path / "run", epochs=3))
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "summary.json", "model.safetensors", "plots/curves.png"):
        assert (run / name).is_file(), name
    assert ckpt.list_checkpoints(run / "checkpoints")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"train", "test"}
    assert sum(r["split"] == "test" for r in rows) == 3  # one evaluation per epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 * 8 and summary["eval_images"] == 64
    # Synthetic classes are separable: three epochs must beat chance (10%) by far.
    assert result.final_top1 > 0.5
    # The saved config reloads as a recipe and reproduces the options.
    again = cnntrain.build_config(str(run / "config.yaml"))
    assert again.model == "lenet" and again.epochs == 3


def test_load_and_evaluate_a_finished_run(tmp_path):
    result = cnntrain.train(tiny(tmp_path / "run"))
    model = cnntrain.load(result.run_dir)
    assert not model.training and len(model.classes) == 10
    scores = cnntrain.evaluate(result.run_dir)
    assert scores.count == 64
    assert scores.top1 == pytest.approx(result.final_top1)
    assert sum(scores.class_total) == 64


def test_same_seed_same_weights(tmp_path):
    a = cnntrain.train(tiny(tmp_path / "a", max_steps=6))
    b = cnntrain.train(tiny(tmp_path / "b", max_steps=6))
    wa, wb = weights(a.run_dir), weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Crash(Exception):
    pass


class CrashAfterCheckpoint(cnntrain.Callback):
    """Crash the run right after the checkpoint of step ``at_step`` is in place (``unlink``: with
    its manifest removed first, as a crash between the two writes leaves it)."""

    def __init__(self, at_step: int, drop_manifest: bool = False) -> None:
        self.at_step, self.drop_manifest = at_step, drop_manifest

    def on_checkpoint(self, loop, path) -> None:
        if loop.state.step == self.at_step:
            if self.drop_manifest:
                ckpt.manifest_path(path).unlink()
            raise Crash


def train_until_crash(options: dict, at_step: int) -> None:
    """Train ``options`` and crash right after the checkpoint of step ``at_step`` is written."""
    with pytest.raises(Crash):
        cnntrain.train(options, callbacks=[CrashAfterCheckpoint(at_step)])


FAST_RECIPE_PARTS = dict(lookahead=2, alternate_flip=True, augment="translate-flip")
ACCUMULATED = dict(accum_steps=2, epochs=3)  # 4 steps per epoch: the crash at step 9 is mid epoch 3


@pytest.mark.parametrize("precision,extra", [("fp32", {}), ("bf16", {}), ("fp16", {}), ("fp32", FAST_RECIPE_PARTS),
                                             ("fp16", ACCUMULATED)])
def test_resume_from_a_mid_epoch_checkpoint_equals_uninterrupted(tmp_path, precision, extra):
    options = dict(save_every=3, ema_decay=0.9, label_smoothing=0.1, display_every=5, precision=precision)
    options.update(extra)
    full = cnntrain.train(tiny(tmp_path / "full", **options))
    part = tiny(tmp_path / "part", **options)
    train_until_crash(part, 9)  # mid epoch 2 (8 steps per epoch), mid log window (every 5 steps)
    resumed = cnntrain.train({**part, "resume": "auto"})
    assert same_weights(full.run_dir, resumed.run_dir)
    assert metrics_rows(full.run_dir) == metrics_rows(resumed.run_dir)



@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_auto_equals_uninterrupted(tmp_path):
    options = tiny(tmp_path / "killed", epochs=4, synthetic_size=512, save_every=2)
    full = cnntrain.train({**options, "run_dir": str(tmp_path / "full")})
    cmd = [sys.executable, "-m", "cnntrain", "train", *cli_args(options)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            found = ckpt.list_checkpoints(folder)
            if found and found[-1][0] >= 20:  # past epoch 1 (16 steps), mid epoch 2
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    result = subprocess.run([*cmd, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    wa, wb = weights(full.run_dir), weights(tmp_path / "killed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    result = cnntrain.train(tiny(tmp_path / precision, precision=precision, epochs=3))
    assert result.final_top1 > 0.3
    assert result.summary["precision"] == precision


def test_static_loss_scale_is_kept(tmp_path):
    result = cnntrain.train(tiny(tmp_path / "s", precision="fp16", loss_scale=128, max_steps=4))
    assert result.summary["loss_scale"] == 128


def test_diverging_loss_stops_with_the_step_and_advice(tmp_path):
    with pytest.raises(NumericalError, match=r"not finite for 3 steps.*lower --lr"):
        cnntrain.train(tiny(tmp_path / "nan", lr=1e30, momentum=0.0, max_bad_steps=3, epochs=4))


def test_batch_larger_than_the_data_set_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="larger than"):
        cnntrain.train(tiny(tmp_path / "b", batch_size=100000))


def test_model_that_cannot_take_the_images_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot take images"):
        cnntrain.train(tiny(tmp_path / "m", model="inception_v3"))


def test_tensorboard_gets_the_same_scalars_as_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cnntrain.train(tiny(tmp_path / "tb", tensorboard=True))
    events = EventAccumulator(str(result.run_dir / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/img_per_s", "train/loss_scale", "train/grad_norm",
            "test/top1_err", "test/top5_err"} <= set(tags["scalars"])
    assert "train/augmented_samples" in tags["images"]
    with open(result.run_dir / "metrics.csv") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    logged = events.Scalars("test/top1_err")
    assert [e.step for e in logged] == [int(r["step"]) for r in test_rows]
    assert logged[-1].value == pytest.approx(float(test_rows[-1]["top1_err"]), rel=1e-4)


def test_crash_between_checkpoint_and_manifest_resumes_from_the_previous_one(tmp_path):
    options = dict(save_every=3)
    full = cnntrain.train(tiny(tmp_path / "full", **options))
    part = tiny(tmp_path / "part", **options)
    with pytest.raises(Crash):  # step-9.pt in place, its manifest never written: an incomplete checkpoint
        cnntrain.train(part, callbacks=[CrashAfterCheckpoint(9, drop_manifest=True)])
    assert ckpt.latest_valid(tmp_path / "part" / "checkpoints").name == "step-00000008.pt"  # the epoch-end one
    resumed = cnntrain.train({**part, "resume": "auto"})
    assert same_weights(full.run_dir, resumed.run_dir)


def test_fp16_overflow_steps_are_skipped_and_counted_not_trained_on(tmp_path):
    # A static scale of 1e30 overflows fp16 gradients on every step: nothing may reach the weights.
    start = cnntrain.train(tiny(tmp_path / "init", max_steps=1, lr=1e-12))
    result = cnntrain.train(tiny(tmp_path / "s", precision="fp16", loss_scale=1e30, max_steps=6))
    assert result.summary["skipped_steps"] == 6
    w0, w1 = weights(start.run_dir), weights(result.run_dir)
    assert all(torch.allclose(w0[k], w1[k], atol=1e-9) for k in w0 if w0[k].is_floating_point())


class _Corners(torch.nn.Module):
    """Logits = the top-left and bottom-right pixels of channel 0: shows which views were scored."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, -1, -1]], dim=1)


def test_test_time_augmentation_weights_the_views_as_documented():
    from cnntrain.engine.evaluate import evaluate, tta_logits

    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4r + c
    model = _Corners()
    assert torch.equal(tta_logits(model, x), torch.tensor([[0.0, 15.0]]))
    # Mirror: the top-left of the mirror image is x[0, 3].
    assert torch.equal(tta_logits(model, x, flip=True), torch.tensor([[1.5, 13.5]]))
    # Shifted by 1 with reflection, both corners of both shifted views read x[1, 1] = 5 and x[2, 2] = 10.
    assert torch.equal(tta_logits(model, x, translate=1), torch.tensor([[0.5 * 0 + 0.5 * 5, 0.5 * 15 + 0.5 * 10]]))
    result = evaluate(model, [(x, torch.tensor([1]))], 2, device=x.device, tta_flip=True, tta_translate=1)
    assert result.count == 1 and result.top1 == 1.0


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    options = dict(max_steps=6, augment="none", display_every=2)
    large = cnntrain.train(tiny(tmp_path / "large", batch_size=32, **options))
    small = cnntrain.train(tiny(tmp_path / "small", batch_size=8, accum_steps=4, **options))
    wa, wb = weights(large.run_dir), weights(small.run_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5) for k in wa)
    rows = [metrics_rows(r.run_dir) for r in (large, small)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # optimizer steps, not micro-batches
    for a, b in zip(*rows):
        if a["split"] == "train":
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert small.summary["global_batch"] == 32 and small.summary["img_per_s"] > 0


def test_accumulation_beyond_the_data_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="x 16 accumulation steps is larger than the 256 training images"):
        cnntrain.train(tiny(tmp_path / "r", batch_size=32, accum_steps=16))


def test_resume_keeps_the_global_batch_and_accumulation_makes_it_up(tmp_path):
    """Steps and the LR schedule count global batches: resuming with half the batch is refused
    (nothing touched), and with half the batch x 2 accumulated it ends where the uninterrupted run does."""
    options = tiny(tmp_path / "run", batch_size=32, augment="none", display_every=2)
    full = cnntrain.train({**options, "run_dir": str(tmp_path / "full")})
    train_until_crash(options, 8)  # the end of epoch 1
    before = {name: (tmp_path / "run" / name).read_text() for name in ("metrics.csv", "config.yaml")}
    with pytest.raises(ConfigError, match=r"global batch of 32 \(1 processes\), but this run's is 16 .* = 32"):
        cnntrain.train({**options, "batch_size": 16, "resume": "auto"})
    assert {name: (tmp_path / "run" / name).read_text() for name in before} == before  # nothing touched
    resumed = cnntrain.train({**options, "batch_size": 16, "accum_steps": 2, "resume": "auto"})
    assert resumed.steps == full.steps == 16
    wa, wb = weights(full.run_dir), weights(resumed.run_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5) for k in wa)


def test_a_fresh_run_refuses_a_used_run_folder_unless_overwrite_and_frees_it_after_a_crash(tmp_path):
    """A second fresh run into a folder with checkpoints would prune or shadow them: refused, naming
    both ways on; --overwrite starts over; a run that crashed leaves the folder free for --resume."""
    options = tiny(tmp_path / "run", max_steps=4, save_every=2)
    first = cnntrain.train(options)
    with pytest.raises(ConfigError, match=r"already holds checkpoints .*--resume auto.*--overwrite"):
        cnntrain.train(options)
    assert weights(first.run_dir).keys()  # the first run's files are intact
    again = cnntrain.train({**options, "overwrite": True})
    assert [s for s, _ in ckpt.list_checkpoints(again.run_dir / "checkpoints")] == [2, 4]
    with pytest.raises(Crash):
        cnntrain.train({**options, "max_steps": 8, "resume": "auto"}, callbacks=[CrashAfterCheckpoint(6)])
    resumed = cnntrain.train({**options, "max_steps": 8, "resume": "auto"})  # the crash released the folder
    assert resumed.steps == 8


def test_callbacks_see_every_moment_in_order(tmp_path):
    class Record(cnntrain.Callback):
        def __init__(self):
            self.seen = []

        def on_train_start(self, loop):
            self.seen.append(("start", loop.state.step))

        def on_log(self, loop, row):
            self.seen.append(("log", row["step"]))

        def on_eval_end(self, loop, result):
            self.seen.append(("eval", loop.state.step))

        def on_save_checkpoint(self, loop, payload, path):
            payload.setdefault("callbacks", {})["record"] = loop.state.step
            self.seen.append(("save", path.name))

        def on_checkpoint(self, loop, path):
            self.seen.append(("saved", path.name))

        def on_load_checkpoint(self, loop, payload):
            self.seen.append(("loaded", payload["callbacks"]["record"]))

        def on_step_end(self, loop, outcome):
            self.seen.append(("step", loop.state.step))

        def on_train_end(self, loop, summary):
            self.seen.append(("end", summary["steps"]))

    first = Record()
    cnntrain.train(tiny(tmp_path / "run", max_steps=4, display_every=2, save_every=2, eval_every=4),
                   callbacks=[first])
    assert first.seen == [("start", 0), ("step", 1), ("log", 2), ("save", "step-00000002.pt"),
                          ("saved", "step-00000002.pt"), ("step", 2), ("step", 3), ("log", 4), ("eval", 4),
                          ("save", "step-00000004.pt"), ("saved", "step-00000004.pt"), ("step", 4), ("end", 4)]
    resumed = Record()
    cnntrain.train(tiny(tmp_path / "run", max_steps=5, display_every=2, save_every=2, eval_every=4, resume="auto"),
                   callbacks=[resumed])
    assert resumed.seen[:2] == [("loaded", 4), ("start", 4)]  # what a callback saved comes back on resume


@pytest.mark.parametrize("spec, message", [("no_such_module:Thing", "cannot import it"),
                                           ("pathlib:PurePath", "did not give a cnntrain Callback"),
                                           ("tests.helpers:tiny", "calling it failed")])
def test_a_callback_that_cannot_be_loaded_is_one_clear_error(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=rf"--callbacks {spec!r}: .*{message}"):
        cnntrain.train(tiny(tmp_path / "run", max_steps=1, callbacks=[spec]))


def test_a_callback_stops_the_run_and_a_resume_does_not_train_on(tmp_path):
    class StopAt(cnntrain.Callback):
        def on_step_end(self, loop, outcome):
            if loop.state.step == 3:
                loop.request_stop("enough at step 3")

    options = tiny(tmp_path / "run", max_steps=8, save_every=2)
    result = cnntrain.train(options, callbacks=[StopAt()])
    assert result.steps == 3 and result.summary["stopped"] == "enough at step 3"
    newest = ckpt.latest_valid(result.run_dir / "checkpoints")
    assert newest.name == "step-00000003.pt"
    assert torch.load(newest, weights_only=True)["stopped"] == "enough at step 3"
    before = weights(result.run_dir)
    again = cnntrain.train({**options, "resume": "auto"})
    assert again.steps == 3 and again.summary["stopped"] == "enough at step 3"
    after = weights(again.run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)

"""Mixup / CutMix (data/mixing.py): torchvision's transforms, timm's switching, soft targets and the
loss they give with label smoothing."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cnntrain.data.mixing import BatchStage, Mixing
from cnntrain.engine.metrics import TrainWindow
from cnntrain.engine.step import make_loss_fn


def _batch(n: int = 8, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, k, (n,), generator=g)


def _seeded(transform, images, labels, generator_seed: int):
    """What Mixing does with a generator seeded ``generator_seed``: its two draws, then its seed."""
    g = torch.Generator().manual_seed(generator_seed)
    torch.rand(2, generator=g)
    torch.manual_seed(int(torch.randint(0, 1 << 62, (), generator=g)))
    return transform(images, labels)


def test_mixup_targets_sum_to_one_and_mix_images_and_labels_alike():
    images, labels = _batch()
    mixing = Mixing(5, mixup=0.4)
    out, targets = mixing(images.clone(), labels, torch.Generator().manual_seed(3))
    assert targets.shape == (8, 5) and torch.allclose(targets.sum(1), torch.ones(8))
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    lam = float(targets[0, labels[0]]) if labels[0] != labels[-1] else None
    # One weight for the batch: each image is lam of itself and 1 - lam of its neighbour.
    lam = float(((out - images.roll(1, 0)) / (images - images.roll(1, 0))).flatten()[0]) if lam is None else lam
    assert torch.allclose(out, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5)
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-6)
    ref_images, ref_targets = _seeded(v2.MixUp(alpha=0.4, num_classes=5), images.clone(), labels, 3)
    assert torch.equal(out, ref_images) and torch.equal(targets, ref_targets)  # torchvision's, on the same seed


def test_cutmix_pastes_a_box_and_weighs_the_labels_by_its_area():
    images, labels = _batch(seed=1)
    mixing = Mixing(5, cutmix=1.0)
    out, targets = mixing(images.clone(), labels, torch.Generator().manual_seed(4))
    assert torch.allclose(targets.sum(1), torch.ones(8))
    pasted = (out != images).any(dim=1)[0]  # [H, W]: where image 0 shows its neighbour
    area = pasted.float().mean().item()
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert 0 < area < 1
    assert torch.allclose(targets, (1 - area) * one_hot + area * one_hot.roll(1, 0), atol=1e-6)
    ref_images, ref_targets = _seeded(v2.CutMix(alpha=1.0, num_classes=5), images.clone(), labels, 4)
    assert torch.equal(out, ref_images) and torch.equal(targets, ref_targets)


def test_switching_and_mix_prob_as_timm():
    both = Mixing(5, mixup=1.0, cutmix=1.0, prob=1.0, switch_prob=0.3)
    picks = [both.choose(torch.Generator().manual_seed(s)) for s in range(400)]
    assert all(p is not None for p in picks)
    assert 80 < sum(p is both.cutmix for p in picks) < 160  # about 30% CutMix
    half = Mixing(5, mixup=1.0, prob=0.5)
    unmixed = [half.choose(torch.Generator().manual_seed(s)) is None for s in range(400)]
    assert 150 < sum(unmixed) < 250
    images, labels = _batch()
    never = Mixing(5, mixup=1.0, prob=0.0)
    out, targets = never(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and torch.equal(targets, torch.nn.functional.one_hot(labels, 5).float())


def test_loss_on_soft_targets_with_label_smoothing_equals_the_hand_computation():
    images, labels = _batch()
    _, targets = Mixing(5, mixup=1.0)(images, labels, torch.Generator().manual_seed(2))
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(5))
    smoothing = 0.1
    loss = make_loss_fn(smoothing)(logits, targets)
    log_p = torch.log_softmax(logits, 1)
    smoothed = targets * (1 - smoothing) + smoothing / 5
    assert torch.allclose(loss, -(smoothed * log_p).sum(1).mean(), atol=1e-6)
    # timm's form: lam * CE(smooth(y_a)) + (1 - lam) * CE(smooth(y_b)), lam per image from its target
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    lam = float(((targets - one_hot.roll(1, 0)) / (one_hot - one_hot.roll(1, 0))).nan_to_num(nan=2.0).min())
    mine = -((one_hot * (1 - smoothing) + smoothing / 5) * log_p).sum(1)
    theirs = -((one_hot.roll(1, 0) * (1 - smoothing) + smoothing / 5) * log_p).sum(1)
    assert torch.allclose(loss, (lam * mine + (1 - lam) * theirs).mean(), atol=1e-5)


def test_the_training_window_scores_soft_targets_by_their_largest_share():
    window = TrainWindow(torch.device("cpu"))
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    targets = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    window.add(torch.tensor(1.0), logits, targets)
    assert window.sums[1].item() == 1 and window.sums[2].item() == 3


class _Loader:
    seed, rank = 1, 0

    def __len__(self) -> int:
        return 5

    def iterate(self, epoch: int, start_step: int = 0):
        for step in range(start_step, 5):
            images, labels = _batch(seed=100 * epoch + step)
            yield images, labels


def test_the_batch_stage_resumes_mid_epoch_exactly():
    stage = BatchStage(_Loader(), erase=0.5, mixing=Mixing(5, mixup=0.8, cutmix=1.0, prob=0.9))
    full = list(stage.iterate(2))
    resumed = list(stage.iterate(2, start_step=3))
    assert len(full) == 5 and len(resumed) == 2
    for (x, y), (u, v) in zip(full[3:], resumed):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert not torch.equal(full[0][0], next(stage.iterate(3))[0])  # another epoch, other draws


def test_async_ps_trains_with_mixing_erasing_and_a_policy_as_synchronous_training(tmp_path):
    """One async-ps worker under --max-staleness 0 is synchronous SGD: with the batch stage and a policy on,
    it ends with exactly the synchronous run's weights (the workers build their loaders as the trainer does)."""
    import cnntrain
    from tests.helpers import tiny, weights
    from tests.test_async_ps import _cluster_options, _run_in_threads

    options = dict(synthetic_shape=[3, 16, 16], model="resnet20", epochs=1, progress="none", mixup=0.4, cutmix=1.0,
                   random_erase=0.5, auto_augment="trivialaugment", label_smoothing=0.1)
    cnntrain.train(tiny(tmp_path / "sync", **options))
    _run_in_threads(_cluster_options(tmp_path / "async", 1, **options, max_staleness=0), workers=1)
    expected, got = weights(tmp_path / "sync"), weights(tmp_path / "async")
    assert all(torch.equal(expected[k], got[k]) for k in expected)

"""--class-weights and --balanced-sampler (data/balance.py), and the class counts at the start."""

from __future__ import annotations

import logging

import pytest
import torch

import cnntrain
from cnntrain.data.balance import BalancedOrder, class_weights, imbalance_note, read_weights_file
from cnntrain.data.base import ArrayDataset
from cnntrain.data.pipeline import DeviceLoader
from cnntrain.engine.step import make_loss_fn
from cnntrain.errors import ConfigError
from tests.fixtures import write_image_folder
from tests.helpers import tiny

CLASSES = ["cat", "dog", "owl"]


def test_auto_weights_are_inverse_frequency_and_change_the_loss_as_weighted_cross_entropy():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weights = class_weights("auto", labels, CLASSES)
    assert weights == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    target = torch.tensor([0, 2, 1, 0])
    per_image = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = torch.tensor(weights)[target]
    loss = make_loss_fn(class_weights=torch.tensor(weights))(logits, target)
    assert loss.item() == pytest.approx(float((w * per_image).sum() / w.sum()))
    assert loss.item() != pytest.approx(make_loss_fn()(logits, target).item())
    # The rare class's mistake weighs more: raising its logit lowers the weighted loss more.
    assert weights[2] > weights[1] > weights[0]


@pytest.mark.parametrize("text, want", [("dog: 2.5\n", [1, 2.5, 1]), ("[1, 2, 3]", [1, 2, 3]),
                                        ("0.5\n1\n2\n", [0.5, 1, 2]), ('{"owl": 4}', [1, 1, 4])])
def test_a_weights_file_gives_a_weight_per_class(tmp_path, text, want):
    path = tmp_path / "weights.yaml"
    path.write_text(text)
    assert read_weights_file(path, CLASSES) == want


@pytest.mark.parametrize("text, message", [("emu: 2\n", "unknown class"), ("[1, 2]", "2 weights for 3 classes"),
                                           ("[1, -2, 1]", "must be finite and >= 0"), ("[1, x, 1]", "not a number"),
                                           ("[0, 0, 0]", "every weight is 0")])
def test_a_bad_weights_file_is_refused_naming_it(tmp_path, text, message):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"--class-weights {path}: .*{message}"):
        read_weights_file(path, CLASSES)
    with pytest.raises(ConfigError, match="--class-weights .*missing.yaml: cannot read it"):
        read_weights_file(tmp_path / "missing.yaml", CLASSES)


def test_a_run_with_a_missing_weights_file_fails_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt: cannot read it"):
        cnntrain.train(tiny(tmp_path / "run", max_steps=1, class_weights=str(tmp_path / "nope.txt")))


def _loader(labels: torch.Tensor, rank: int, world: int) -> DeviceLoader:
    data = ArrayDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels, CLASSES)
    loader = DeviceLoader(data, 8, device=torch.device("cpu"), mean=(0.0,), std=(1.0,), shuffle=True, seed=3,
                          rank=rank, world_size=world)
    loader.order = BalancedOrder(labels, 3, seed=3)
    return loader


def test_balanced_order_evens_out_classes_and_is_exact_across_ranks_and_on_resume():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = BalancedOrder(labels, 3, seed=3)
    drawn = torch.cat([order(e) for e in range(5)])
    share = torch.bincount(labels[drawn], minlength=3).float() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03)  # plain shuffling: 0.90 / 0.09 / 0.01
    assert torch.equal(order(1), BalancedOrder(labels, 3, seed=3)(1)) and not torch.equal(order(1), order(2))
    # Two ranks take disjoint slices of the same draw, which together are one process's global batches.
    one = _loader(labels, 0, 1)
    ranks = [_loader(labels, r, 2) for r in range(2)]
    for step in (0, 7, 62):
        both = torch.cat([r.step_indices(4, step) for r in ranks])
        assert torch.equal(torch.sort(both).values, torch.sort(one.order(4)[step * 16:(step + 1) * 16]).values)
    # A resumed epoch (start_step) sees exactly the rest of the uninterrupted one.
    full = [y for _, y in ranks[1].iterate(2)]
    rest = [y for _, y in ranks[1].iterate(2, start_step=30)]
    assert len(rest) == len(full) - 30 and all(torch.equal(a, b) for a, b in zip(full[30:], rest))


def test_the_start_shows_class_counts_when_they_differ_more_than_2x(tmp_path, caplog):
    assert imbalance_note(torch.tensor([0] * 10 + [1] * 5 + [2] * 6), CLASSES) == ""
    note = imbalance_note(torch.tensor([0] * 10 + [1] * 4 + [2] * 6), CLASSES)
    assert note == "class counts differ 2.5x: cat 10, owl 6, dog 4"
    write_image_folder(tmp_path / "data", classes=("ant",), per_class=9)
    write_image_folder(tmp_path / "data", classes=("bee",), per_class=3)
    write_image_folder(tmp_path / "data", classes=("ant", "bee"), per_class=2, split="val")
    options = tiny(tmp_path / "run", dataset="folder", data_dir=str(tmp_path / "data"), model="resnet20",
                   max_steps=1, batch_size=4)
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        cnntrain.train(options)
    assert "class counts differ 3.0x: ant 9, bee 3 (--class-weights auto or --balanced-sampler may help)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        cnntrain.train({**options, "class_weights": "auto", "overwrite": True})
    assert "class weights (auto): ant 0.667, bee 2" in caplog.text and "may help" not in caplog.text

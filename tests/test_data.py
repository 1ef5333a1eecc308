"""Tests for trainers.data: splits, formats on disk, determinism, augmentation, errors.

No data set can be downloaded here, so CIFAR and ImageFolder trees are written in their real
on-disk formats into tmp_path.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_cifar10, write_cifar100, write_imagefolder, write_pickle

from trainers.catalog.data import CIFAR, check_data, known_datasets
from trainers.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, TensorLoader, build_data
from trainers.registry import ConfigError

CIFAR10_MEAN, CIFAR10_STD = CIFAR["cifar10"].mean, CIFAR["cifar10"].std
CIFAR100_MEAN, CIFAR100_STD = CIFAR["cifar100"].mean, CIFAR["cifar100"].std


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.batches(epoch))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def _meta(b) -> tuple[int, ...]:
    return (b.num_train, b.num_test, b.num_classes, b.in_channels, b.image_size)


def _unnormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)


# --- digits and synthetic --------------------------------------------------------------------
def test_digits_split_shapes_and_normalisation():
    b = build_data(DataConfig("digits"), batch_size=1437, seed=0)
    assert _meta(b) == (1437, 360, 10, 1, 8)
    assert len(b.train) == 1 and len(b.test) == 1
    [(x, y)] = _epoch(b.train, 0)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert sorted(Counter(y.tolist()).keys()) == list(range(10))


def test_digits_test_loader_yields_each_example_once():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    *_, y_test = train_test_split(
        d.data, d.target, test_size=0.2, random_state=0, stratify=d.target
    )
    b = build_data(DataConfig("digits"), batch_size=64, seed=0)
    batches = _epoch(b.test, 0)
    assert len(batches) == len(b.test) == 6  # 360 = 5 * 64 + 40: the last batch is kept
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == y_test.tolist()  # not shuffled, nothing dropped
    assert Counter(labels.tolist()) == Counter(y_test.tolist())
    assert _same(batches, _epoch(b.test, 5))  # the test stream ignores the epoch


def test_synthetic_shapes_and_labels():
    cfg = DataConfig("synthetic", image_size=16, num_classes=7, channels=3, num_train=140)
    b = build_data(cfg, batch_size=32, seed=0)
    assert (b.num_classes, b.in_channels, b.image_size, b.num_train, b.num_test) == (
        7,
        3,
        16,
        140,
        256,
    )
    assert len(b.train) == 140 // 32
    for x, y in _epoch(b.train, 0):
        assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 7
    yt = torch.cat([y for _, y in _epoch(b.test, 0)])
    assert len(yt) == 256 and set(yt.tolist()) == set(range(7))
    # the test set depends on data_seed only, not on the run seed
    assert _same(_epoch(b.test, 0), _epoch(build_data(cfg, 32, seed=9).test, 0))


# --- determinism ---------------------------------------------------------------------------
@pytest.fixture
def cifar10_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, write_cifar10(tmp_path)


def _cfgs(root: Path) -> list[DataConfig]:
    return [
        DataConfig("synthetic", num_train=96, num_test=16),
        DataConfig("cifar10", root=str(root)),
    ]


def test_determinism_and_resume(cifar10_root):
    root, _ = cifar10_root
    rng_before = torch.get_rng_state()
    for cfg in _cfgs(root):
        a, b = build_data(cfg, 16, seed=1).train, build_data(cfg, 16, seed=1).train
        e3 = _epoch(a, 3)
        assert _same(e3, _epoch(b, 3))
        assert not _same(e3, _epoch(a, 4))
        assert not _same(e3, _epoch(build_data(cfg, 16, seed=2).train, 3))
        for e in range(3):  # an uninterrupted run ...
            _epoch(a, e)
        resumed = build_data(cfg, 16, seed=1).train  # ... and a run resumed at epoch 3
        assert _same(_epoch(a, 3), _epoch(resumed, 3))
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is left alone


# --- CIFAR on-disk format ------------------------------------------------------------------
@pytest.mark.parametrize("form", ["folder", "parent"])
def test_cifar10_real_format(cifar10_root, form):
    parent, ref = cifar10_root
    root = parent / "cifar-10-batches-py" if form == "folder" else parent
    check_data(DataConfig("cifar10", root=str(root)))
    b = build_data(DataConfig("cifar10", root=str(root)), batch_size=4, seed=0)
    assert _meta(b) == (100, 10, 10, 3, 32)
    batches = _epoch(b.test, 0)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = _unnormalise(torch.cat([x for x, _ in batches]), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.equal(x, torch.from_numpy(ref["xte"]).view(-1, 3, 32, 32))
    assert torch.cat([y for _, y in batches]).tolist() == ref["yte"].tolist()
    # training images (augmentation off) are the 5 batches in file order, shuffled
    b = build_data(DataConfig("cifar10", root=str(root), augment=False), 100, seed=0)
    assert isinstance(b.train, TensorLoader)
    [(xr, yr)] = b.train.raw_batches(0)
    order = b.train.epoch_plan(0)[0]
    assert torch.equal(xr, torch.from_numpy(ref["xtr"]).view(-1, 3, 32, 32)[order])
    assert yr.tolist() == ref["ytr"][order.numpy()].tolist()


@pytest.mark.parametrize("form", ["folder", "parent"])
def test_cifar100_real_format(tmp_path, form):
    ref = write_cifar100(tmp_path)
    root = tmp_path / "cifar-100-python" if form == "folder" else tmp_path
    b = build_data(DataConfig("cifar100", root=str(root)), batch_size=8, seed=0)
    assert (b.num_train, b.num_test, b.num_classes) == (30, 10, 100)
    batches = _epoch(b.test, 0)
    x = _unnormalise(torch.cat([x for x, _ in batches]), CIFAR100_MEAN, CIFAR100_STD)
    assert torch.equal(x, torch.from_numpy(ref["xte"]).view(-1, 3, 32, 32))
    assert torch.cat([y for _, y in batches]).tolist() == ref["yte"].tolist()  # fine labels


def test_cifar_augmentation_is_pad4_crop_and_flip(cifar10_root):
    root, ref = cifar10_root
    b = build_data(DataConfig("cifar10", root=str(root)), batch_size=50, seed=3)
    loader = b.train
    assert isinstance(loader, TensorLoader)
    order, offsets, flips = loader.epoch_plan(0)
    originals = torch.from_numpy(ref["xtr"]).view(-1, 3, 32, 32)
    found = []
    for bi, (x, _) in enumerate(loader.raw_batches(0)):
        for j, img in enumerate(x):
            k = bi * 50 + j
            padded = F.pad(originals[order[k]], (4, 4, 4, 4))  # zeros
            windows = padded.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
            hits = []  # every (offset, flip) whose window equals the augmented image
            for flip in (False, True):
                target = img.flip(-1) if flip else img
                match = (windows == target[:, None, None]).flatten(3).all(-1).all(0)  # (9, 9)
                hits += [(dy, dx, flip) for dy, dx in match.nonzero().tolist()]
            assert len(hits) == 1, f"sample {k} is not a padded crop (or its flip) of its original"
            found.append(hits[0])
            assert hits[0] == (*offsets[k].tolist(), bool(flips[k]))
    assert len(found) == 100
    assert len({(dy, dx) for dy, dx, _ in found}) > 10  # offsets vary across the batch
    assert {f for *_, f in found} == {False, True}
    assert any(dy != 4 or dx != 4 for dy, dx, _ in found)  # not all centred


def test_cifar_pickle_with_foreign_globals_is_rejected(cifar10_root):
    root, _ = cifar10_root
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [print]}  # builtins.print
    write_pickle(root / "cifar-10-batches-py" / "test_batch", evil, protocol=2)
    with pytest.raises(ConfigError, match="test_batch"):
        build_data(DataConfig("cifar10", root=str(root)), 4, seed=0)


# --- ImageNet (ImageFolder) ----------------------------------------------------------------
def test_imagenet_imagefolder(tmp_path):
    write_imagefolder(
        tmp_path, {"train": {"ant": 4, "bee": 4, "cat": 4}, "val": {"ant": 2, "bee": 2, "cat": 2}}
    )
    cfg = DataConfig("imagenet", root=str(tmp_path), image_size=32, num_workers=0)
    check_data(cfg)
    rng_before = torch.get_rng_state()
    b = build_data(cfg, batch_size=4, seed=0)
    assert _meta(b) == (12, 6, 3, 3, 32)
    assert len(b.train) == 3 and len(b.test) == 2
    train = _epoch(b.train, 0)
    test = _epoch(b.test, 0)
    assert [x.shape for x, _ in train] == [(4, 3, 32, 32)] * 3
    assert [x.shape for x, _ in test] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.cat([y for _, y in test]).tolist() == [0, 0, 1, 1, 2, 2]  # each val image once
    assert Counter(torch.cat([y for _, y in train]).tolist()) == {0: 4, 1: 4, 2: 4}
    for x, y in train + test:  # the label is the folder: class k is dominated by channel k
        colour = _unnormalise(x, IMAGENET_MEAN, IMAGENET_STD).float().mean((2, 3)).argmax(1)
        assert torch.equal(colour, y)
    assert torch.equal(rng_before, torch.get_rng_state())
    # augmentation is seeded per sample from (seed, epoch): equal across worker counts and
    # for a fresh loader asked for epoch 1 directly (resume)
    e1 = _epoch(b.train, 1)
    assert not _same(e1, train)
    two_workers = build_data(dataclasses.replace(cfg, num_workers=2), 4, seed=0)
    assert _same(e1, _epoch(two_workers.train, 1))


def test_imagenet_val_uses_train_class_indices(tmp_path):
    write_imagefolder(
        tmp_path, {"train": {"ant": 2, "bee": 2, "cat": 2}, "val": {"ant": 1, "cat": 2}}
    )
    b = build_data(DataConfig("imagenet", root=str(tmp_path), image_size=16, num_workers=0), 2, 0)
    assert torch.cat([y for _, y in _epoch(b.test, 0)]).tolist() == [0, 2, 2]


# --- errors ----------------------------------------------------------------------------------
def _config_error(cfg: DataConfig) -> str:
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_check_data_errors(tmp_path):
    assert "data.root is required for cifar10" in _config_error(DataConfig("cifar10"))
    assert "data.root is required for imagenet" in _config_error(DataConfig("imagenet"))
    missing = tmp_path / "nope"
    assert str(missing) in _config_error(DataConfig("cifar100", root=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _config_error(DataConfig("cifar10", root=str(empty)))
    assert str(empty) in msg and "data_batch_1" in msg and "cifar-10-batches-py" in msg
    partial = tmp_path / "partial" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    (partial / "data_batch_1").write_bytes(b"")
    (partial / "readme.txt").write_text("hi")
    msg = _config_error(DataConfig("cifar10", root=str(partial)))
    assert str(partial) in msg and "test_batch" in msg
    msg = _config_error(DataConfig("imagenet", root=str(empty)))
    assert str(empty) in msg and "train/" in msg
    (tmp_path / "inet" / "train" / "ant").mkdir(parents=True)
    (tmp_path / "inet" / "val" / "ant").mkdir(parents=True)
    msg = _config_error(DataConfig("imagenet", root=str(tmp_path / "inet")))
    assert str(tmp_path / "inet" / "train") in msg and "no images" in msg
    check_data(DataConfig("digits"))  # no files needed
    check_data(DataConfig("synthetic"))


def test_imagenet_val_with_unknown_class(tmp_path):
    write_imagefolder(tmp_path, {"train": {"ant": 1, "bee": 1}, "val": {"cat": 1}})
    msg = _config_error(DataConfig("imagenet", root=str(tmp_path)))
    assert "cat" in msg and str(tmp_path / "val") in msg


def test_unknown_dataset_lists_known_names():
    assert known_datasets() == ["digits", "synthetic", "cifar10", "cifar100", "imagenet"]
    for call in (
        lambda: check_data(DataConfig("mnist")),
        lambda: build_data(DataConfig("mnist"), 8, 0),
    ):
        with pytest.raises(ConfigError, match="'mnist'.*digits"):
            call()


def test_bad_batch_size():
    with pytest.raises(ConfigError, match="batch_size=4096 exceeds the 1437 training images"):
        build_data(DataConfig("digits"), batch_size=4096, seed=0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        build_data(DataConfig("digits"), batch_size=0, seed=0)

"""Data sets and deterministic batch loaders.

Every random choice of the training stream (order, crops, flips) is drawn from a CPU
``torch.Generator`` seeded from ``(seed, epoch)`` alone, never from the global RNG, so a run
resumed at epoch k sees exactly the batches of an uninterrupted run, and the test set (fixed
by ``data_seed``) is identical across run seeds. So is the validation split
(``data.val_split``: :func:`trainers.split.validation_split`), held out of the training set
before anything else looks at it (the channel statistics are the kept images').
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from trainers.catalog.data import (
    CIFAR,
    DATASETS,
    CifarUnpickler,
    DataConfig,
    cifar_dir,
    class_dirs,
)
from trainers.registry import ConfigError
from trainers.split import validation_split

__all__ = ["DataBundle", "DataConfig", "TensorLoader", "build_data"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_PAD = 4  # He et al. 2016: 4-pixel zero padding, random 32x32 crop, random flip


class Loader(Protocol):
    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def shard(self, lo: int, hi: int) -> None: ...


@dataclass
class DataBundle:
    train: Loader  # training batches, augmented, drop_last
    test: Loader  # not augmented, not shuffled, every example exactly once
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int  # the images trained on (without the validation split)
    num_test: int
    # the held-out part of the training set (data.val_split), evaluated like the test set
    val: Loader | None = None
    num_val: int = 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The only source of training randomness: depends on (seed, epoch) and nothing else."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


def crop_flip(x: Tensor, offsets: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Per-sample random crop (window at ``offsets`` of the zero-padded image) + h-flip.

    One gather on index grids instead of a Python loop: the flip is folded into the column
    indices, so crop and flip cost a single indexing kernel on whatever device ``x`` is on.
    """
    b, c, h, w = x.shape
    if pad:
        padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
        padded[:, :, pad : pad + h, pad : pad + w] = x
    else:
        padded = x
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = offsets[:, :1] + ar_h  # (B, H)
    cols = offsets[:, 1:] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class TensorLoader:
    """Batches from a whole data set held as one uint8 NCHW tensor on the target device.

    Per-sample torchvision transforms behind a DataLoader are launch/IPC bound for small
    images; keeping the set resident and augmenting whole batches with vectorised tensor ops
    is how fast CIFAR trainers (airbench) work, and it makes resume-exactness trivial.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int,
        seed: int,
        train: bool,
        pad: int | None,  # None: no augmentation; 0: flip only; >0: crop (zero pad) + flip
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.train, self.pad = batch_size, seed, train, pad
        self.lo, self.hi = 0, batch_size  # this process's slice of each training batch
        dev = images.device
        m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        # (x/255 - mean)/std folded into one multiply-add per element
        self._scale = (1 / (255 * s)).view(1, -1, 1, 1).to(dev, torch.float32)
        self._shift = (-m / s).view(1, -1, 1, 1).to(dev, torch.float32)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(order, offsets (M, 2), flip (M,)) of a training epoch, all drawn up front on CPU.

        Drawing everything at once keeps the random stream independent of how many batches the
        caller consumes and of the device (CUDA generators give different numbers).
        """
        g = epoch_generator(self.seed, epoch)
        m = len(self) * self.batch_size
        order = torch.randperm(len(self.labels), generator=g)[:m]
        hi = 2 * (self.pad or 0) + 1
        offsets = torch.randint(0, hi, (m, 2), generator=g)
        flip = torch.rand(m, generator=g) < 0.5
        return order, offsets, flip

    def raw_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches as uint8 pixels (after augmentation, before normalisation)."""
        bs, dev = self.batch_size, self.images.device
        if not self.train:
            for i in range(0, len(self.labels), bs):
                yield self.images[i : i + bs], self.labels[i : i + bs]
            return
        order, offsets, flip = (t.to(dev) for t in self.epoch_plan(epoch))
        for i in range(0, len(order), bs):
            a, b = i + self.lo, i + self.hi  # data-parallel: our slice of the global batch
            idx = order[a:b]
            x = self.images[idx]
            if self.pad is not None:
                x = crop_flip(x, offsets[a:b], flip[a:b], self.pad)
            yield x, self.labels[idx]

    def shard(self, lo: int, hi: int) -> None:
        """Yield only [lo, hi) of every training batch (the global plan is unchanged)."""
        self.lo, self.hi = lo, hi

    def normalise(self, x: Tensor) -> Tensor:
        return x.float().mul_(self._scale).add_(self._shift)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.raw_batches(epoch):
            yield self.normalise(x), y


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (float64, chunked for memory)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.double() / 255
        total += c.sum((0, 2, 3))
        sq += c.square().sum((0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = total / n
    std = (sq / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant channel: avoid x/0
    return tuple(mean.tolist()), tuple(std.tolist())


def _bundle(
    cfg: DataConfig,
    arrays: tuple[Tensor, Tensor, Tensor, Tensor],
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
    num_classes: int,
    pad: int | None,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> DataBundle:
    """The loaders of a data set held as tensors; ``stats`` None: the channel statistics of
    the images trained on (after the validation split is held out)."""
    xtr, ytr, xte, yte = arrays
    xval = yval = None
    if cfg.val_split:
        kept, held = (torch.from_numpy(i) for i in validation_split(
            ytr.cpu().numpy(), cfg.val_split, cfg.data_seed))  # fmt: skip
        xtr, ytr, xval, yval = xtr[kept], ytr[kept], xtr[held], ytr[held]
    _check_batch_size(cfg.effective_name, batch_size, len(ytr))
    stats = stats or _channel_stats(xtr)
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))  # resident on the device
    train = TensorLoader(xtr, ytr, *stats, batch_size, seed, True, pad)
    test = TensorLoader(xte, yte, *stats, batch_size, seed, False, None)
    val = None
    if xval is not None and yval is not None:
        val = TensorLoader(xval.to(device), yval.to(device), *stats, batch_size, seed, False, None)
    n, c, h, _ = xtr.shape
    n_val = 0 if yval is None else len(yval)
    return DataBundle(train, test, num_classes, c, h, n, len(yte), val, n_val)


def _check_batch_size(name: str, batch_size: int, num_train: int) -> None:
    if batch_size > num_train:
        raise ConfigError(
            f"batch_size={batch_size} exceeds the {num_train} training images of {name}"
        )


def build_digits(cfg: DataConfig, batch_size: int, seed: int, device: torch.device) -> DataBundle:
    from trainers.digits import digits_split  # scikit-learn's bundled file, read without sklearn

    xtr, xte, ytr, yte = (torch.from_numpy(a) for a in digits_split(cfg.data_seed))
    # No augmentation whatever cfg.augment says: the paper has no digits recipe, and the digits
    # are centred 8x8 glyphs where crops destroy information (and flips change the digit).
    arrays = (xtr, ytr.long(), xte, yte.long())
    return _bundle(cfg, arrays, None, 10, None, batch_size, seed, device)


def build_synthetic(
    cfg: DataConfig, batch_size: int, seed: int, device: torch.device
) -> DataBundle:
    for field in ("image_size", "num_classes", "channels", "num_train", "num_test"):
        if getattr(cfg, field) <= 0:
            raise ConfigError(f"data.{field}={getattr(cfg, field)} must be positive for synthetic")
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    g = torch.Generator().manual_seed(cfg.data_seed)
    # Smooth (low-resolution, upsampled) prototypes: learnable by small conv nets quickly.
    low = torch.rand((k, c, max(1, s // 4), max(1, s // 4)), generator=g)
    protos = 32 + 192 * F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced labels
        x = torch.empty((n, c, s, s), dtype=torch.uint8)
        for i in range(0, n, 4096):  # bounded float memory for large sets
            yi = y[i : i + 4096]
            noise = 48 * torch.randn((len(yi), c, s, s), generator=g)
            x[i : i + 4096] = (protos[yi] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return x, y

    xtr, ytr = draw(cfg.num_train)
    xte, yte = draw(cfg.num_test)  # same distribution, later draws: different samples
    pad = 0 if cfg.augment else None  # flip only
    return _bundle(cfg, (xtr, ytr, xte, yte), None, k, pad, batch_size, seed, device)


# --- CIFAR (python pickle version) ----------------------------------------------------------
# Our own loader rather than torchvision.datasets.CIFAR10/100: torchvision verifies the official
# files' MD5 sums, so the small files that tests write in the real format cannot load through it.


def _load_cifar_file(path: Path, key: bytes) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # R, G, B planes
        y = np.asarray(d[key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise ConfigError(f"{str(path)!r} is not a CIFAR python batch file ({e})") from None
    if len(x) != len(y):
        raise ConfigError(f"{str(path)!r} has {len(x)} images but {len(y)} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def build_cifar(cfg: DataConfig, batch_size: int, seed: int, device: torch.device) -> DataBundle:
    c = CIFAR[cfg.name]
    if cfg.download:  # opt-in; torchvision fetches, verifies and extracts into root
        import torchvision.datasets as tvd

        root = Path(str(cfg.root)).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        (tvd.CIFAR10 if cfg.name == "cifar10" else tvd.CIFAR100)(str(root), download=True)
    d = cifar_dir(cfg)
    parts = [_load_cifar_file(d / f, c.labels_key) for f in c.train_files]
    xte, yte = _load_cifar_file(d / c.test_file, c.labels_key)
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    for y in (ytr, yte):  # num_classes comes from the data set, not from the labels present
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= c.classes):
            raise ConfigError(f"{cfg.name} labels in {str(d)!r} must lie in [0, {c.classes})")
    pad = CIFAR_PAD if cfg.augment else None
    stats = (c.mean, c.std)
    return _bundle(cfg, (xtr, ytr, xte, yte), stats, c.classes, pad, batch_size, seed, device)


# --- ImageNet (ImageFolder trees root/train and root/val) -------------------------------------
class _SeededImages(Dataset):
    """ImageFolder whose items are ``(index, sample_seed)``: the transform of each sample runs
    under its own seed, so augmentation depends on (seed, epoch, position) only, not on the
    worker count, worker scheduling or how many epochs ran before (exact resume), and the
    caller's global RNG is restored afterwards (num_workers=0 runs transforms in-process)."""

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform: Any) -> None:
        from torchvision.datasets import ImageFolder

        try:  # allow_empty: val may lack some classes; check_data ensures some images exist
            self.folder = f = ImageFolder(str(root), transform=transform, allow_empty=True)
        except (FileNotFoundError, OSError) as e:
            raise ConfigError(f"cannot read images under {str(root)!r}: {e}") from None
        if f.class_to_idx != class_to_idx:  # relabel val by the train class list
            f.samples = [(p, class_to_idx[f.classes[t]]) for p, t in f.samples]
            f.targets = [t for _, t in f.samples]
            f.classes, f.class_to_idx = list(class_to_idx), dict(class_to_idx)

    def keep(self, indices: list[int]) -> None:
        """Only these samples (a validation split's side), in this order."""
        f = self.folder
        f.samples = [f.samples[i] for i in indices]
        f.targets = [t for _, t in f.samples]
        f.imgs = f.samples

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:
        index, sample_seed = item
        with torch.random.fork_rng(devices=[]):  # CPU RNG only; restored on exit
            torch.default_generator.manual_seed(sample_seed)  # torchvision v1 uses torch RNG
            return self.folder[index]


class ImageFolderLoader:
    """DataLoader over an ImageFolder; order and per-sample seeds come from (seed, epoch)."""

    def __init__(
        self, data: _SeededImages, batch_size: int, seed: int, train: bool, num_workers: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.data, self.batch_size, self.seed, self.train = data, batch_size, seed, train
        self.num_workers, self.device = num_workers, device
        self.lo, self.hi = 0, batch_size

    def shard(self, lo: int, hi: int) -> None:
        """Load only [lo, hi) of every training batch: each process decodes its own images."""
        self.lo, self.hi = lo, hi

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        n, g = len(self.data), epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        items = list(zip(order.tolist(), seeds.tolist(), strict=True))
        bs = self.batch_size
        if self.train and (self.lo, self.hi) != (0, bs):
            full = len(items) // bs * bs  # drop_last of the *global* batch, then our slice
            items = [it for i in range(0, full, bs) for it in items[i + self.lo : i + self.hi]]
            bs = self.hi - self.lo
        loader = DataLoader(
            self.data,
            batch_size=bs,
            sampler=items,  # any iterable
            drop_last=self.train,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # DataLoader draws its worker base seed from `generator` (else from the global RNG,
            # even with 0 workers): (seed, epoch) seeds the workers and leaves the global RNG be.
            generator=g,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_imagenet(cfg: DataConfig, batch_size: int, seed: int, device: torch.device) -> DataBundle:
    from torchvision import transforms as T

    if cfg.image_size <= 0 or cfg.num_workers < 0:
        raise ConfigError(f"imagenet needs data.image_size > 0 and data.num_workers >= 0, got "
                          f"{cfg.image_size} and {cfg.num_workers}")  # fmt: skip
    root, size = Path(str(cfg.root)).expanduser(), cfg.image_size
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if cfg.augment else []
    train_tf = T.Compose([*aug, *norm])
    test_tf = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), *norm])  # 256/224
    classes = {c: i for i, c in enumerate(class_dirs(root / "train"))}
    train = _SeededImages(root / "train", classes, train_tf)
    test = _SeededImages(root / "val", classes, test_tf)
    val = None
    if cfg.val_split:  # held out of train/, transformed like the test set
        kept, held = validation_split(np.asarray(train.folder.targets), cfg.val_split,
                                      cfg.data_seed)  # fmt: skip
        val = _SeededImages(root / "train", classes, test_tf)
        train.keep(kept.tolist())
        val.keep(held.tolist())
    _check_batch_size(cfg.name, batch_size, len(train))
    vals = None if val is None else ImageFolderLoader(val, batch_size, seed, False,
                                                      cfg.num_workers, device)  # fmt: skip
    return DataBundle(
        ImageFolderLoader(train, batch_size, seed, True, cfg.num_workers, device),
        ImageFolderLoader(test, batch_size, seed, False, cfg.num_workers, device),
        len(classes), 3, size, len(train), len(test), vals, 0 if val is None else len(val),
    )  # fmt: skip


def _build_custom(cfg: DataConfig, batch_size: int, seed: int, device: torch.device) -> DataBundle:
    """``data._target_``: a callable returning (x_train, y_train, x_test, y_test), images
    uint8 N x C x H x W and integer labels 0..C-1; resident on the device like digits and
    CIFAR, normalised with the training set's channel statistics, not augmented."""
    from trainers.custom import resolve_target

    key = f"data._target_={cfg._target_}"
    out = resolve_target(cfg._target_ or "", "data")(**(cfg.args or {}))
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ConfigError(f"{key} must return (x_train, y_train, x_test, y_test)")
    xtr, ytr, xte, yte = (torch.as_tensor(t) for t in out)
    for name, x in (("x_train", xtr), ("x_test", xte)):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ConfigError(
                f"{key}: {name} is {x.dtype} of shape {tuple(x.shape)}; expected uint8 N x C x H x W"
            )
    if xtr.shape[1:] != xte.shape[1:]:
        raise ConfigError(
            f"{key}: train images {tuple(xtr.shape[1:])} != test {tuple(xte.shape[1:])}"
        )
    for name, y, x in (("y_train", ytr, xtr), ("y_test", yte, xte)):
        if y.ndim != 1 or len(y) != len(x) or y.dtype.is_floating_point or (len(y) and y.min() < 0):
            raise ConfigError(f"{key}: {name} must be {len(x)} integer labels >= 0")
    ytr, yte = ytr.long(), yte.long()
    num_classes = int(max(ytr.max(), yte.max())) + 1
    return _bundle(cfg, (xtr, ytr, xte, yte), None, num_classes, None, batch_size, seed, device)


def build_data(
    cfg: DataConfig, batch_size: int, seed: int, device: torch.device | str = "cpu"
) -> DataBundle:
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    if cfg._target_:
        return _build_custom(cfg, batch_size, seed, torch.device(device))
    entry = DATASETS.get(cfg.name)
    entry.check(cfg)
    return entry.build(cfg, batch_size, seed, torch.device(device))

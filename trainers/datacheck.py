"""The pre-flight side of the built-in data sets: which exist, and whether their files are
where the config says -- without importing torch, so that the sweeper can check every point
of a grid before any job starts (and before a second of torch import). The loaders that
build the data are in :mod:`trainers.data`, which imports torch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from trainers.config import DataConfig
from trainers.registry import ConfigError, Registry

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_CIFAR = {  # name: (folder, train files, test file, labels key, classes, mean, std)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                b"labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100,
                 CIFAR100_MEAN, CIFAR100_STD),
}  # fmt: skip


def _no_check(cfg: DataConfig) -> None:
    """digits and synthetic need no files."""


def _root(cfg: DataConfig, expected: str) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root is required for {cfg.name}: {expected}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"data.root {str(root)!r} does not exist or is not a directory ({cfg.name} expects {expected})"
        )
    return root


def _cifar_dir(cfg: DataConfig) -> Path:
    folder, train_files, test_file, *_ = _CIFAR[cfg.name]
    root = _root(cfg, f"a directory in the CIFAR python format ({folder})")
    need = [*train_files, test_file]
    for cand in (root, root / folder):  # the extracted folder itself, or its parent
        if all((cand / f).is_file() for f in need):
            return cand
    names = ", ".join(need)
    raise ConfigError(
        f"data.root {str(root)!r} holds no {cfg.name} data: expected {names} "
        f"(CIFAR python version) in it or in {str(root / folder)!r}"
    )


def _check_cifar(cfg: DataConfig) -> None:
    if not cfg.download:
        _cifar_dir(cfg)
    elif not cfg.root:  # the download creates root, so only its name is needed up front
        raise ConfigError(f"data.root is required for {cfg.name}: the directory to download into")


def _class_dirs(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir())


# torchvision.datasets.folder.IMG_EXTENSIONS, the files ImageFolder loads; copied so that
# the pre-flight does not import torchvision (and torch) to check a folder
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _has_image(split: Path, classes: list[str]) -> bool:
    for c in classes:  # stops at the first image: cheap even on the full ImageNet tree
        for e in os.scandir(split / c):
            if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
                return True
    return False


def _check_imagenet(cfg: DataConfig) -> None:
    if cfg.download:
        raise ConfigError("data.download is only supported for cifar10/cifar100, not imagenet")
    expected = "a directory with train/ and val/ ImageFolder trees (one sub-folder per class)"
    root = _root(cfg, expected)
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise ConfigError(
                f"data.root {str(root)!r} has no {split}/ folder: imagenet expects {expected}"
            )
        classes[split] = _class_dirs(d)
        if not _has_image(d, classes[split]):
            raise ConfigError(
                f"{str(d)!r} holds no images: imagenet expects one sub-folder per class with image files"
            )
    unknown = sorted(set(classes["val"]) - set(classes["train"]))
    if unknown:
        raise ConfigError(
            f"{str(root / 'val')!r} has class folders not in train/: {', '.join(unknown[:5])} "
            "(val must use the train class names)"
        )


CHECKS: Registry[Callable[[DataConfig], None] | None] = Registry("data")
CHECKS.register("digits", None)
CHECKS.register("synthetic", None)
CHECKS.register("cifar10", _check_cifar)
CHECKS.register("cifar100", _check_cifar)
CHECKS.register("imagenet", _check_imagenet)


def known_datasets() -> list[str]:
    return CHECKS.names()


def check_data(cfg: DataConfig) -> None:
    """Cheap pre-flight: raises ConfigError naming the path when the data cannot be found
    (for a ``_target_``: that it imports and accepts its arguments)."""
    if cfg._target_:
        from trainers.custom import check_call, resolve_target

        fn = resolve_target(cfg._target_, "data")
        check_call(fn, "data", cfg._target_, knobs=cfg.args, knobs_at="data.args")
        return
    check = CHECKS.get(cfg.name)
    if check is not None:
        check(cfg)

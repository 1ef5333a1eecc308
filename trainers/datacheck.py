"""The pre-flight side of the built-in data sets: which exist, and whether their files are
where the config says -- without importing torch, so that the sweeper can check every point
of a grid before any job starts (and before a second of torch import). The loaders that
build the data are in :mod:`trainers.data`, which imports torch."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def digits_csv() -> Path:
    """The ``sklearn/datasets/data/digits.csv.gz`` of the installed scikit-learn (its
    loader, :mod:`trainers.digits`, reads it; :func:`dataset_ref` hashes it)."""
    try:
        spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    raise ConfigError("data=digits needs scikit-learn installed (it ships the digits data set)")


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


# ------------------------------------------------------------------ describing a data set
# Which of the ``data`` keys each built-in data set reads (the rest are other data sets'
# knobs: a digits run's ``image_size`` means nothing). What MLflow shows of a run's data
# (sweeper.describe) and its dataset input (dataset_ref) come from here.
DATA_KNOBS: dict[str, tuple[str, ...]] = {
    "digits": ("data_seed",),  # the stratified split; never augmented (trainers.data)
    "synthetic": ("image_size", "num_classes", "channels", "num_train", "num_test",
                  "data_seed", "augment"),
    "cifar10": ("root", "augment"),
    "cifar100": ("root", "augment"),
    "imagenet": ("root", "augment", "image_size"),
}  # fmt: skip

# sklearn's digits: 1,797 images of 8 x 8, grey, 10 classes; trainers.digits splits 20 % off
# (stratified, ceil(0.2 * 1797) = 360 test images)
DIGITS_FACTS = {"images": "1x8x8", "num_classes": 10, "num_train": 1437, "num_test": 360}


def data_facts(data: dict[str, Any]) -> dict[str, Any]:
    """What the run's data *is*, as far as it is known without loading it: image shape
    (C x H x W), classes, train and test images. ``data``: the run's data identity."""
    name = data.get("name")
    if data.get("_target_"):
        return {}
    if name == "digits":
        return dict(DIGITS_FACTS)
    if name == "synthetic":
        s, c = data.get("image_size"), data.get("channels")
        return {"images": f"{c}x{s}x{s}", "num_classes": data.get("num_classes"),
                "num_train": data.get("num_train"), "num_test": data.get("num_test")}  # fmt: skip
    if name in _CIFAR:
        classes = _CIFAR[name][4]
        return {"images": "3x32x32", "num_classes": classes, "num_train": 50000,
                "num_test": 10000}  # fmt: skip
    if name == "imagenet":
        s = data.get("image_size")
        return {"images": f"3x{s}x{s} (crops)"}
    return {}


@dataclass(frozen=True)
class DatasetRef:
    """A run's data set as MLflow records a dataset input: ``digest`` tells different data
    apart (16 hex digits of a sha256), ``source`` says where it came from."""

    name: str
    digest: str
    source_type: str  # local | code
    source: str
    profile: dict[str, Any]


def _sha(*parts: bytes) -> Any:  # a hashlib sha256 object
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h


@functools.lru_cache(maxsize=64)
def _files_digest(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    """sha256 over the files' bytes, cached per (path, size, mtime): a sweep hashes each
    CIFAR folder once (about 0.4 s for CIFAR-10's 178 MB), not once per run."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _digest_files(paths: list[Path]) -> str:
    stamps = tuple((st.st_size, st.st_mtime_ns) for st in (p.stat() for p in paths))
    return _files_digest(tuple(str(p) for p in paths), stamps)


def _canon(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def dataset_ref(data: dict[str, Any]) -> DatasetRef:
    """The run's data set as an MLflow dataset input, from its data identity (no torch).

    The digest is of what determines the images the run trains and tests on:

    * digits: the bytes of the ``digits.csv.gz`` scikit-learn ships, and the split's seed;
    * synthetic: the generator's knobs (the images are a deterministic function of them);
    * CIFAR: the bytes of the batch files in ``data.root`` (hashed once per process);
    * ImageNet: the names of the class folders and of every image file in ``train/`` and
      ``val/`` (contents are not read: 1.28 M files would take minutes), with ``image_size``;
    * your own ``data._target_``: its dotted name, its arguments and the source of its
      module (``trainers.custom.current_fingerprint``).
    """
    name = str(data.get("_target_") or data.get("name"))
    facts = data_facts(data)
    knobs = {k: data.get(k) for k in DATA_KNOBS.get(name, ()) if k != "root"}
    if data.get("_target_"):
        from trainers.custom import current_fingerprint

        target = str(data["_target_"])
        args = {k: v for k, v in data.items() if k != "_target_"}
        fp = current_fingerprint(target)
        digest = _sha(_canon({"target": target, "args": args, "source": fp})).hexdigest()
        return DatasetRef(target.rsplit(".", 1)[-1], digest[:16], "code", target,
                          {"args": args})  # fmt: skip
    if name == "digits":
        path = digits_csv()
        digest = _sha(_digest_files([path]).encode(), _canon(knobs)).hexdigest()
        return DatasetRef("digits", digest[:16], "local", path.as_uri(), {**facts, **knobs})
    if name == "synthetic":
        digest = _sha(b"gradsweep synthetic v1", _canon(knobs)).hexdigest()
        return DatasetRef("synthetic", digest[:16], "code", "trainers.data._build_synthetic",
                          {**facts, **knobs})  # fmt: skip
    if name in _CIFAR:
        cfg = DataConfig(name=name, root=data.get("root"))
        folder = _cifar_dir(cfg)
        files = [folder / f for f in [*_CIFAR[name][1], _CIFAR[name][2]]]
        return DatasetRef(name, _digest_files(files)[:16], "local", folder.as_uri(),
                          {**facts, **knobs})  # fmt: skip
    if name == "imagenet":
        root = Path(str(data.get("root"))).expanduser()
        h = _sha(_canon(knobs))
        counts: dict[str, int] = {}
        for split in ("train", "val"):
            n = 0
            for c in _class_dirs(root / split):
                files = sorted(e.name for e in os.scandir(root / split / c)
                               if e.name.lower().endswith(IMG_EXTENSIONS))  # fmt: skip
                h.update(f"{split}/{c}:".encode() + "\0".join(files).encode())
                n += len(files)
            counts[f"num_{'train' if split == 'train' else 'test'}"] = n
        counts["num_classes"] = len(_class_dirs(root / "train"))
        return DatasetRef("imagenet", h.hexdigest()[:16], "local", root.resolve().as_uri(),
                          {**facts, **counts, **knobs})  # fmt: skip
    raise ConfigError(f"unknown data set {name!r}; known: {', '.join(known_datasets())}")

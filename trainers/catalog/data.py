"""The built-in data sets, one catalog entry each: everything about a data set that needs no
torch, and where its loader is.

An entry says which ``data.*`` keys the data set reads (its config shows only those, and a
key it does not read is refused), checks that its files are where the config says before any
job starts, tells what it *is* (image shape, classes, sizes: the facts MLflow shows), gives
the digest of its MLflow dataset input, and names the function that builds its loaders
(``trainers.data``, which imports torch, imported only when a job builds the data).

**Adding a data set**: an entry in :data:`DATASETS` below, its builder in
:mod:`trainers.data`, and ``conf/data/NAME.yaml`` with its keys.

:class:`DataConfig` is the typed ``data`` config every data set shares below the CLI: all
keys, with the defaults that enter a run's identity (and so its config hash) whether or not
the data set reads them -- that is how the hashes of runs made before data sets had configs
of their own stay the same.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from trainers.registry import ConfigError, Registry


@dataclass
class DataConfig:
    """The run's ``data`` config (every data set's keys; each reads its own, see
    :attr:`DataSet.knobs`). A ``_target_`` (your own data set) replaces the built-in one."""

    name: str = "digits"  # digits | synthetic | cifar10 | cifar100 | imagenet
    root: str | None = None  # directory for cifar10/cifar100/imagenet
    download: bool = False  # cifar only: opt-in torchvision download into root
    augment: bool = True  # apply the dataset's standard training augmentation
    image_size: int = 32  # synthetic: side; imagenet: train crop (test: resize size*8/7, crop)
    num_classes: int = 10  # synthetic only
    channels: int = 3  # synthetic only
    num_train: int = 1024  # synthetic only
    num_test: int = 256  # synthetic only
    data_seed: int = 0  # synthetic generation, digits split, validation split; NOT the run seed
    # the fraction of the training set held out as a validation split (class-stratified,
    # chosen by data_seed) and evaluated every epoch as val_acc / val_loss; 0 = off
    val_split: float = 0.0
    num_workers: int = 2  # imagenet DataLoader workers
    # your own data: a callable returning (x_train, y_train, x_test, y_test), images uint8
    # N x C x H x W, labels int 0..C-1; kept on the device like digits and CIFAR
    _target_: str | None = None
    args: Any = None  # keyword arguments for _target_, e.g. data.args={n_train: 256}

    @property
    def effective_name(self) -> str:
        """``name``, or for a ``_target_`` the callable's name (what runs.data records)."""
        return self._target_.rsplit(".", 1)[-1] if self._target_ else self.name


# keys any data set's config has: which one, and your own data set instead of it
COMMON_KEYS = ("name", "_target_", "args")
# the data keys every built-in data set's identity has held from the first version, with their
# values whether the data set reads them or not: the config hashes of existing runs depend on
# them. Knobs added since enter the identity only when set away from their default, so
# adding one never moves a hash (as for a method's knobs).
IDENTITY_KEYS = ("name", "root", "augment", "image_size", "num_classes", "channels",
                 "num_train", "num_test", "data_seed")  # fmt: skip
# how the data is fetched or fed, not what it is: never in the identity
NOT_IDENTITY = ("download", "num_workers")


@dataclass(frozen=True)
class DatasetRef:
    """A run's data set as MLflow records a dataset input: ``digest`` tells different data
    apart (16 hex digits of a sha256), ``source`` says where it came from."""

    name: str
    digest: str
    source_type: str  # local | code
    source: str
    profile: dict[str, Any]


@dataclass(frozen=True)
class DataSet:
    """One built-in data set."""

    name: str
    summary: str  # one line: what it is
    knobs: tuple[str, ...]  # the data.* keys it reads besides name (its config's keys)
    check: Callable[[DataConfig], None]  # pre-flight: its files are where the config says
    facts: Callable[[dict[str, Any]], dict[str, Any]]  # from the run's data identity
    digest: Callable[[dict[str, Any]], DatasetRef]  # its MLflow dataset input
    builder: str  # "module:function" (data, batch_size, seed, device) -> DataBundle
    schema: type = field(init=False, repr=False, compare=False)  # its Hydra schema

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", _schema(self.name, self.knobs))

    def build(self, cfg: DataConfig, batch_size: int, seed: int, device: Any) -> Any:
        """Its loaders (imports the builder's module, i.e. torch)."""
        module, fn = self.builder.split(":")
        return getattr(importlib.import_module(module), fn)(cfg, batch_size, seed, device)


def _schema(name: str, knobs: tuple[str, ...]) -> type:
    """The data set's Hydra schema: DataConfig's fields restricted to its own keys (same
    types and defaults), so ``--cfg job`` shows them and a key it does not read is refused."""
    types = get_type_hints(DataConfig)
    defaults = {f.name: f.default for f in fields(DataConfig)}
    keep = ("name", *knobs, "_target_", "args")
    cls = "".join(p.capitalize() for p in name.split("_")) + "Data"
    spec = [(k, types[k], field(default=defaults[k])) for k in keep]
    return make_dataclass(cls, spec, namespace={"__module__": __name__})


# ----------------------------------------------------------------------- shared helpers
def _no_check(cfg: DataConfig) -> None:
    """Generated or bundled: no files to look for."""


def _root(cfg: DataConfig, expected: str) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root is required for {cfg.name}: {expected}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"data.root {str(root)!r} does not exist or is not a directory ({cfg.name} expects {expected})"
        )
    return root


def _sha(*parts: bytes) -> Any:  # a hashlib sha256 object
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h


@functools.lru_cache(maxsize=64)
def _files_digest(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    """sha256 over the files' bytes, cached per (path, size, mtime): a sweep hashes each
    CIFAR folder once, not once per run."""
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


def _knobs(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The data set's own knobs in a data identity (``root`` left out: where, not what;
    ``data_seed`` of a data set whose images it chooses only through a validation split left
    out when there is none, so their digests stay what they were before it had a say)."""
    seeded = name in ("digits", "synthetic") or bool(data.get("val_split"))
    return {k: data.get(k) for k in DATASETS.get(name).knobs
            if k in data and k != "root" and (seeded or k != "data_seed")}  # fmt: skip


# ------------------------------------------------------------------------------ digits
# sklearn's digits: 1,797 images of 8 x 8, grey, 10 classes; trainers.digits splits 20 % off
# (stratified, ceil(0.2 * 1797) = 360 test images)
DIGITS_FACTS = {"images": "1x8x8", "num_classes": 10, "num_train": 1437, "num_test": 360}


def digits_csv() -> Path:
    """The ``sklearn/datasets/data/digits.csv.gz`` of the installed scikit-learn (its
    loader, :mod:`trainers.digits`, reads it; the dataset digest hashes it)."""
    try:
        spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    raise ConfigError("data=digits needs scikit-learn installed (it ships the digits data set)")


def _digits_digest(data: dict[str, Any]) -> DatasetRef:
    path = digits_csv()
    knobs = _knobs("digits", data)
    digest = _sha(_digest_files([path]).encode(), _canon(knobs)).hexdigest()
    return DatasetRef("digits", digest[:16], "local", path.as_uri(), {**DIGITS_FACTS, **knobs})


# --------------------------------------------------------------------------- synthetic
def _synthetic_facts(data: dict[str, Any]) -> dict[str, Any]:
    s, c = data.get("image_size"), data.get("channels")
    return {"images": f"{c}x{s}x{s}", "num_classes": data.get("num_classes"),
            "num_train": data.get("num_train"), "num_test": data.get("num_test")}  # fmt: skip


def _synthetic_digest(data: dict[str, Any]) -> DatasetRef:
    knobs = _knobs("synthetic", data)
    digest = _sha(b"gradsweep synthetic v1", _canon(knobs)).hexdigest()
    return DatasetRef("synthetic", digest[:16], "code", "trainers.data.build_synthetic",
                      {**_synthetic_facts(data), **knobs})  # fmt: skip


# ------------------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class CifarFiles:
    """The python-pickle version of a CIFAR set, as torchvision extracts it."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    labels_key: bytes
    classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR = {
    "cifar10": CifarFiles("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                          "test_batch", b"labels", 10, (0.4914, 0.4822, 0.4465),
                          (0.2470, 0.2435, 0.2616)),
    "cifar100": CifarFiles("cifar-100-python", ("train",), "test", b"fine_labels", 100,
                           (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}  # fmt: skip


def cifar_dir(cfg: DataConfig) -> Path:
    """The folder holding the CIFAR batch files (``data.root`` itself or its extracted
    sub-folder); ConfigError naming what is missing."""
    c = CIFAR[cfg.name]
    root = _root(cfg, f"a directory in the CIFAR python format ({c.folder})")
    need = [*c.train_files, c.test_file]
    for cand in (root, root / c.folder):
        if all((cand / f).is_file() for f in need):
            return cand
    raise ConfigError(
        f"data.root {str(root)!r} holds no {cfg.name} data: expected {', '.join(need)} "
        f"(CIFAR python version) in it or in {str(root / c.folder)!r}"
    )


def _check_cifar(cfg: DataConfig) -> None:
    if not cfg.download:
        cifar_dir(cfg)
    elif not cfg.root:  # the download creates root, so only its name is needed up front
        raise ConfigError(f"data.root is required for {cfg.name}: the directory to download into")


class CifarUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles; allow only what they need, so no code runs on load."""

    _ALLOWED = {"_codecs.encode", "numpy.ndarray", "numpy.dtype"} | {
        f"numpy.{core}.{name}"
        for core in ("core", "_core")
        for name in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer")
    }

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np  # here: the catalog is imported by --help, which needs no numpy

        if f"{module}.{name}" not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed it
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


@functools.lru_cache(maxsize=8)
def _cifar_class_counts(folder: str, name: str, stamps: tuple[tuple[int, int], ...]
                        ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:  # fmt: skip
    """(classes, images of each) of a CIFAR training set, read from its files (cached per
    file size and mtime: a sweep reads them once); None when a file cannot be read (the
    job's loader then names it)."""
    import numpy as np

    c = CIFAR[name]
    labels = []
    for f in c.train_files:
        try:
            with open(Path(folder) / f, "rb") as fh:
                labels.append(np.asarray(CifarUnpickler(fh, encoding="bytes").load()[c.labels_key]))
        except Exception:  # noqa: BLE001 -- any unreadable file: the job says which and why
            return None
    classes, counts = np.unique(np.concatenate(labels), return_counts=True)
    return tuple(classes.tolist()), tuple(counts.tolist())


@functools.lru_cache(maxsize=8)
def _imagenet_class_counts(train: str, stamps: tuple[int, ...]
                           ) -> tuple[tuple[str, ...], tuple[int, ...]]:  # fmt: skip
    """(class folders of ``train/``, image files in each), as ImageFolder finds them (cached
    per folder mtimes: a sweep's points scan the tree once)."""
    classes = class_dirs(Path(train))
    counts = [sum(1 for e in os.scandir(Path(train) / c)
                  if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()) for c in classes]  # fmt: skip
    return tuple(classes), tuple(counts)


@functools.lru_cache(maxsize=8)
def _digits_class_counts(data_seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    import numpy as np

    from trainers.digits import digits_split

    classes, counts = np.unique(digits_split(data_seed)[2], return_counts=True)
    return tuple(classes.tolist()), tuple(counts.tolist())


def class_counts(cfg: DataConfig) -> tuple[tuple[Any, ...], tuple[int, ...]] | None:
    """A built-in training set's classes and images per class, without torch (the
    pre-flight of ``data.val_split``); None when not known before its job loads it (a CIFAR
    download not made yet)."""
    if cfg.name == "digits":
        return _digits_class_counts(cfg.data_seed)
    if cfg.name == "synthetic":  # balanced labels: i % num_classes, then shuffled
        k, n = cfg.num_classes, cfg.num_train
        if k <= 0 or n <= 0:  # refused by the sizes' own check
            return None
        return tuple(range(k)), tuple(n // k + (i < n % k) for i in range(k))
    if cfg.name in CIFAR:
        try:
            folder = cifar_dir(cfg)
        except ConfigError:  # to be downloaded by the job
            return None
        paths = [folder / f for f in CIFAR[cfg.name].train_files]
        stamps = tuple((st.st_size, st.st_mtime_ns) for st in (p.stat() for p in paths))
        return _cifar_class_counts(str(folder), cfg.name, stamps)
    if cfg.name == "imagenet":
        train = Path(str(cfg.root)).expanduser() / "train"
        stamps = (train.stat().st_mtime_ns,
                  *(os.stat(train / c).st_mtime_ns for c in class_dirs(train)))  # fmt: skip
        return _imagenet_class_counts(str(train), stamps)
    return None


def _cifar_facts(data: dict[str, Any]) -> dict[str, Any]:
    return {"images": "3x32x32", "num_classes": CIFAR[str(data.get("name"))].classes,
            "num_train": 50000, "num_test": 10000}  # fmt: skip


def _cifar_digest(data: dict[str, Any]) -> DatasetRef:
    name = str(data.get("name"))
    folder = cifar_dir(DataConfig(name=name, root=data.get("root")))
    c = CIFAR[name]
    files = [folder / f for f in [*c.train_files, c.test_file]]
    return DatasetRef(name, _digest_files(files)[:16], "local", folder.as_uri(),
                      {**_cifar_facts(data), **_knobs(name, data)})  # fmt: skip


# ---------------------------------------------------------------------------- ImageNet
# torchvision.datasets.folder.IMG_EXTENSIONS, the files ImageFolder loads; copied so that
# the pre-flight does not import torchvision (and torch) to check a folder
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_LAYOUT = "a directory with train/ and val/ ImageFolder trees (one sub-folder per class)"


def class_dirs(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir())


def _has_image(split: Path, classes: list[str]) -> bool:
    for c in classes:  # stops at the first image: cheap even on the full ImageNet tree
        for e in os.scandir(split / c):
            if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
                return True
    return False


def _check_imagenet(cfg: DataConfig) -> None:
    root = _root(cfg, IMAGENET_LAYOUT)
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise ConfigError(
                f"data.root {str(root)!r} has no {split}/ folder: imagenet expects {IMAGENET_LAYOUT}"
            )
        classes[split] = class_dirs(d)
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


def _imagenet_facts(data: dict[str, Any]) -> dict[str, Any]:
    s = data.get("image_size")
    return {"images": f"3x{s}x{s} (crops)"}


def _imagenet_digest(data: dict[str, Any]) -> DatasetRef:
    """The names of the class folders and of every image file in ``train/`` and ``val/``
    (contents are not read: 1.28 M files would take minutes), with ``image_size``."""
    root = Path(str(data.get("root"))).expanduser()
    knobs = _knobs("imagenet", data)
    h = _sha(_canon(knobs))
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        n = 0
        for c in class_dirs(root / split):
            files = sorted(e.name for e in os.scandir(root / split / c)
                           if e.name.lower().endswith(IMG_EXTENSIONS))  # fmt: skip
            h.update(f"{split}/{c}:".encode() + "\0".join(files).encode())
            n += len(files)
        counts[f"num_{'train' if split == 'train' else 'test'}"] = n
    counts["num_classes"] = len(class_dirs(root / "train"))
    return DatasetRef("imagenet", h.hexdigest()[:16], "local", root.resolve().as_uri(),
                      {**_imagenet_facts(data), **counts, **knobs})  # fmt: skip


# ----------------------------------------------------------------------------- catalog
DATASETS: Registry[DataSet] = Registry("data")
for _entry in (
    DataSet("digits", "scikit-learn's bundled 8x8 digits (offline): 1437 train / 360 test, "
            "1 channel, 10 classes; never augmented", ("data_seed", "val_split"), _no_check,
            lambda d: dict(DIGITS_FACTS), _digits_digest, "trainers.data:build_digits"),
    DataSet("synthetic", "learnable random images of any size and class count (benchmarks, "
            "tests)", ("image_size", "channels", "num_classes", "num_train", "num_test",
                       "data_seed", "augment", "val_split"),
            _no_check, _synthetic_facts, _synthetic_digest, "trainers.data:build_synthetic"),
    DataSet("cifar10", "CIFAR-10 from a local folder in the python format; crop 32 with "
            "4-px padding + flip", ("root", "download", "augment", "data_seed", "val_split"),
            _check_cifar,
            _cifar_facts, _cifar_digest, "trainers.data:build_cifar"),
    DataSet("cifar100", "CIFAR-100 from a local folder in the python format; crop 32 with "
            "4-px padding + flip", ("root", "download", "augment", "data_seed", "val_split"),
            _check_cifar,
            _cifar_facts, _cifar_digest, "trainers.data:build_cifar"),
    DataSet("imagenet", "ImageNet as ImageFolder trees root/train and root/val; random-resized "
            "crop + flip", ("root", "image_size", "num_workers", "augment", "data_seed",
                              "val_split"), _check_imagenet,
            _imagenet_facts, _imagenet_digest, "trainers.data:build_imagenet"),
):  # fmt: skip
    DATASETS.register(_entry.name, _entry)


def known_datasets() -> list[str]:
    return DATASETS.names()


def check_data(cfg: DataConfig) -> None:
    """Cheap pre-flight: raises ConfigError naming the path when the data cannot be found
    (for a ``_target_``: that it imports and accepts its arguments), or when the validation
    split would leave a class without a training or a validation image (the labels read
    without torch: :func:`class_counts`; your own data set: when the pre-flight builds it)."""
    if cfg._target_:
        from trainers.custom import check_call, resolve_target

        fn = resolve_target(cfg._target_, "data")
        check_call(fn, "data", cfg._target_, knobs=cfg.args, knobs_at="data.args")
        return
    DATASETS.get(cfg.name).check(cfg)
    if cfg.val_split and (known := class_counts(cfg)) is not None:
        from trainers.split import check_holdout  # numpy, not torch

        check_holdout(list(known[0]), list(known[1]), cfg.val_split, cfg.data_seed)


def data_config(node: dict[str, Any]) -> DataConfig:
    """The typed ``data`` config from the composed ``data`` node: only the data set's own
    keys (ConfigError naming a key it does not read and listing those it does)."""
    name = str(node.get("name") or "digits")
    if name not in DATASETS:
        DATASETS.get(name)  # ConfigError listing the known ones
    allowed = (*COMMON_KEYS[:1], *DATASETS.get(name).knobs, *COMMON_KEYS[1:])
    for k in node:
        if k not in allowed:
            raise ConfigError(
                f"unknown key 'data.{k}' for data={name}; its keys: {', '.join(allowed)}"
            )
    return DataConfig(**{k: v for k, v in node.items()})


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """The data part of a run's identity (:meth:`trainers.config.RunConfig.identity`).

    A ``_target_``: its dotted name and arguments, nothing else. A built-in data set: the
    :data:`IDENTITY_KEYS` (its location as an absolute path: two roots may hold different
    data, and relative spellings agree), then its own later knobs where not default."""
    if cfg._target_:
        held = {"val_split": cfg.val_split, "data_seed": cfg.data_seed} if cfg.val_split else {}
        return {"_target_": cfg._target_, **(cfg.args or {}), **held}
    out = {k: getattr(cfg, k) for k in IDENTITY_KEYS}
    if out.get("root"):
        out["root"] = os.path.abspath(os.path.expanduser(out["root"]))
    defaults = {f.name: f.default for f in fields(DataConfig)}
    for k in data_knobs(cfg.name):
        if k not in IDENTITY_KEYS and k not in NOT_IDENTITY and getattr(cfg, k) != defaults[k]:
            out[k] = getattr(cfg, k)
    return out


def data_facts(data: dict[str, Any]) -> dict[str, Any]:
    """What the run's data *is*, as far as it is known without loading it: image shape
    (C x H x W), classes, train and test images. ``data``: the run's data identity."""
    if data.get("_target_") or data.get("name") not in DATASETS:
        return {}
    facts = DATASETS.get(str(data["name"])).facts(data)
    n, frac = facts.get("num_train"), data.get("val_split")
    if frac and isinstance(n, int):  # held out of the training set (rounded up, as sklearn)
        facts["num_val"] = math.ceil(float(frac) * n)
        facts["num_train"] = n - facts["num_val"]
    return facts


def data_knobs(name: str) -> tuple[str, ...]:
    """The ``data.*`` keys data set ``name`` reads (() for an unknown one)."""
    return DATASETS.get(name).knobs if name in DATASETS else ()


def dataset_ref(data: dict[str, Any]) -> DatasetRef:
    """The run's data set as an MLflow dataset input, from its data identity (no torch).
    The digest is of what determines the images the run trains and tests on (see each data
    set's digest); your own ``data._target_``: its dotted name, its arguments and the source
    of its module (``trainers.custom.current_fingerprint``)."""
    if data.get("_target_"):
        from trainers.custom import current_fingerprint

        target = str(data["_target_"])
        args = {k: v for k, v in data.items() if k != "_target_"}
        fp = current_fingerprint(target)
        digest = _sha(_canon({"target": target, "args": args, "source": fp})).hexdigest()
        return DatasetRef(target.rsplit(".", 1)[-1], digest[:16], "code", target,
                          {"args": args})  # fmt: skip
    ref = DATASETS.get(str(data.get("name"))).digest(data)
    if data.get("val_split"):  # another training set: another digest (none moves without)
        held = {"val_split": data["val_split"], "data_seed": data.get("data_seed")}
        digest = _sha(ref.digest.encode(), _canon(held)).hexdigest()[:16]
        profile = dict(ref.profile)
        if isinstance(n := profile.get("num_train"), int):  # as data_facts counts them
            profile["num_val"] = math.ceil(float(data["val_split"]) * n)
            profile["num_train"] = n - profile["num_val"]
        ref = DatasetRef(ref.name, digest, ref.source_type, ref.source, profile)
    return ref

"""Stratified splits: the digits' train/test split and every data set's validation split.

``stratified_split_indices`` re-implements the first split of scikit-learn's
``StratifiedShuffleSplit`` (as ``train_test_split(..., stratify=y)`` draws it) without
importing scikit-learn: the same arithmetic and the same sequence of
``numpy.random.RandomState`` calls as ``StratifiedShuffleSplit._iter_indices`` and
``sklearn.utils.extmath._approximate_mode`` (scikit-learn 1.9); ``tests/test_digits_split.py``
pins it bit for bit against scikit-learn.

``data.val_split`` holds out part of a training set with the same function, seeded by
``data.data_seed`` (never the run seed, so every seed of a configuration trains and validates
on the same images): the held-out images are what scikit-learn's
``train_test_split(range(n), test_size=val_split, random_state=data_seed, stratify=y)``
returns as its test part. How many images of each class each side gets depends only on the
class counts and the seed, so :func:`check_holdout` refuses a split that empties a class
before any image is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainers.registry import ConfigError

__all__ = ["check_holdout", "holdout_sizes", "stratified_split_indices", "validation_split"]


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """Mirror of ``sklearn.utils.extmath._approximate_mode`` (ties broken with ``rng``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            # Drawn even when every tied class is taken: it advances rng, as sklearn's does.
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def holdout_sizes(
    class_counts: Sequence[int] | np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) images per class (classes in label order) of
    :func:`stratified_split_indices` on labels with these counts: its first draws."""
    counts = np.asarray(class_counts, dtype=np.int64)
    n_test = math.ceil(test_size * int(counts.sum()))  # sklearn rounds the test side up
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, int(counts.sum()) - n_test, rng)
    return n_i, _approximate_mode(counts - n_i, n_test, rng)


def stratified_split_indices(
    y: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices equal to ``train_test_split(..., stratify=y)``'s, for a float
    ``test_size`` in (0, 1) and an int ``seed``: the first split of ``StratifiedShuffleSplit``.
    """
    n_samples = len(y)
    # _validate_shuffle_split: a float test_size rounds the test set up, train gets the rest.
    n_test = math.ceil(test_size * n_samples)
    n_train = n_samples - n_test
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise ValueError("each class needs 2 members, and each side one per class")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])

    rng = np.random.RandomState(seed)  # check_random_state(int)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(classes)):
        perm = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def check_holdout(
    classes: Sequence[object], class_counts: Sequence[int], fraction: float, seed: int
) -> None:
    """ConfigError (one line) when ``data.val_split=fraction`` would leave a class of the
    training set (``classes`` with their ``class_counts``, in label order) without a training
    image or without a validation image."""
    kept, held = holdout_sizes(class_counts, fraction, seed)
    for c, n, k, v in zip(classes, class_counts, kept, held, strict=True):
        if k == 0 or v == 0:
            side = "training" if k == 0 else "validation"
            raise ConfigError(
                f"data.val_split={fraction:g} leaves class {c} ({n} training image"
                f"{'' if n == 1 else 's'}) with no {side} image; allowed: a fraction in (0, 1) "
                "that keeps at least one image of every class on each side"
            )


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices into a training set with labels ``y``, each in ascending
    order (the kept images keep their order), stratified by class and fixed by ``seed``
    (``data.data_seed``); ConfigError when a class would end up empty on either side."""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    check_holdout(classes.tolist(), counts.tolist(), fraction, seed)
    kept, held = stratified_split_indices(y, fraction, seed)
    return np.sort(kept), np.sort(held)

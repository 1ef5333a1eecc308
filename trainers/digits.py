"""scikit-learn's 8x8 digits and their stratified train/test split, without importing sklearn.

``import sklearn`` is a large part of a job's start-up, so this module reads the
``digits.csv.gz`` that ships inside the installed scikit-learn package (located with
``importlib.util.find_spec``, which does not run ``sklearn/__init__.py``) and re-implements
``sklearn.model_selection.train_test_split(..., test_size=0.2, random_state=seed,
stratify=y)``: the same arithmetic and the same sequence of ``numpy.random.RandomState``
calls as ``StratifiedShuffleSplit._iter_indices`` and ``sklearn.utils.extmath._approximate_mode``
(scikit-learn 1.9). ``tests/test_digits_split.py`` pins the result, bit for bit, against sklearn.
"""

from __future__ import annotations

import functools
import gzip
import math

import numpy as np

from trainers.catalog.data import digits_csv as _digits_csv  # found without numpy or sklearn

TEST_SIZE = 0.2


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (1797, 1, 8, 8), y int64 (1797,)) as ``load_digits`` gives them, read-only."""
    # As sklearn.datasets.load_digits: gzip text, np.loadtxt(delimiter=","), float64; the last
    # column is the target.
    with gzip.open(_digits_csv(), mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    y = data[:, -1].astype(int, copy=False)
    x = np.rint(data[:, :-1] * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


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


def digits_split(data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train uint8 (N,1,8,8), x_test uint8, y_train int64, y_test int64), equal to::

    d = load_digits()
    x = np.rint(d.data * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    train_test_split(x, d.target, test_size=0.2, random_state=data_seed, stratify=d.target)
    """
    x, y = _load_digits()
    train, test = stratified_split_indices(y, TEST_SIZE, data_seed)
    return x[train], x[test], y[train], y[test]

"""scikit-learn's 8x8 digits and their stratified train/test split, without importing sklearn.

``import sklearn`` is a large part of a job's start-up, so this module reads the
``digits.csv.gz`` that ships inside the installed scikit-learn package (located with
``importlib.util.find_spec``, which does not run ``sklearn/__init__.py``) and splits it as
``sklearn.model_selection.train_test_split(..., test_size=0.2, random_state=seed,
stratify=y)`` does (:func:`trainers.split.stratified_split_indices`, shared with the
validation split). ``tests/test_digits_split.py`` pins the result, bit for bit, against sklearn.
"""

from __future__ import annotations

import functools
import gzip

import numpy as np

from trainers.catalog.data import digits_csv as _digits_csv  # found without numpy or sklearn
from trainers.split import stratified_split_indices

__all__ = ["digits_split", "stratified_split_indices"]

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


def digits_split(data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train uint8 (N,1,8,8), x_test uint8, y_train int64, y_test int64), equal to::

    d = load_digits()
    x = np.rint(d.data * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    train_test_split(x, d.target, test_size=0.2, random_state=data_seed, stratify=d.target)
    """
    x, y = _load_digits()
    train, test = stratified_split_indices(y, TEST_SIZE, data_seed)
    return x[train], x[test], y[train], y[test]

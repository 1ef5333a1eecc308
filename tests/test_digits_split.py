"""trainers.digits reproduces sklearn's load_digits + stratified train_test_split bit for bit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainers import digits
from trainers.digits import digits_split, stratified_split_indices
from trainers.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [*range(20), 12345, 2**31 - 1, 2**32 - 1]


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.data * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return x, d.target


@pytest.mark.parametrize("seed", SEEDS)
def test_digits_split_matches_sklearn(sklearn_digits, seed):
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits
    want = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    got = digits_split(seed)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w)
    assert got[0].dtype == np.uint8 and got[2].dtype == np.int64
    assert got[0].shape == (1437, 1, 8, 8) and got[1].shape == (360, 1, 8, 8)


def test_digits_split_is_repeatable_and_returns_fresh_arrays():
    a, b = digits_split(3), digits_split(3)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v) and u is not v and u.flags.writeable


@pytest.mark.parametrize("n, k, test_size", [(50, 3, 0.1), (301, 7, 0.25), (1000, 10, 1 / 3)])
@pytest.mark.parametrize("seed", [0, 1, 7, 99])
def test_stratified_split_indices_matches_sklearn_on_other_labels(n, k, test_size, seed):
    """Uneven classes (ties in the rounding remainders included) and other test sizes."""
    from sklearn.model_selection import train_test_split

    y = np.random.RandomState(n + seed).randint(0, k, size=n)
    y[:k] = y[k : 2 * k] = np.arange(k)  # every class has at least 2 members
    idx = np.arange(n)
    want_train, want_test = train_test_split(
        idx, test_size=test_size, random_state=seed, stratify=y
    )
    train, test = stratified_split_indices(y, test_size, seed)
    assert np.array_equal(train, want_train) and np.array_equal(test, want_test)


def test_missing_sklearn_is_a_config_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ConfigError, match="scikit-learn"):
        digits._digits_csv()


def test_digits_split_does_not_import_sklearn():
    code = (
        "import sys\n"
        "from trainers.digits import digits_split\n"
        "xtr, xte, ytr, yte = digits_split(0)\n"
        "assert xtr.shape == (1437, 1, 8, 8), xtr.shape\n"
        "bad = sorted(m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.'))\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr

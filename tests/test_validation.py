"""``data.val_split`` (issue 24, part 3): a class-stratified part of the training set, fixed by
``data.data_seed``, held out and evaluated every epoch as ``val_acc`` / ``val_loss``.

* the split against scikit-learn's ``train_test_split`` (the independent implementation),
  the same for two run seeds, another for another data seed, disjoint from the kept images,
  for digits, synthetic, CIFAR files, an ImageFolder tree and your own ``data._target_``;
* identities: unchanged at 0 (the pinned hashes are ``tests/test_store.py``'s), moved by it;
* a digits run records val metrics per epoch equal to an independent evaluation of its
  final checkpoint on the held-out images (recomputed here with scikit-learn and numpy);
* an older store gains the columns and still reports (selected on test); a report over runs
  that all have a validation split chooses α on it and says ``selected_on`` val.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, main_in_process, sql, train, write_cifar10, write_imagefolder
from report_stores import add_run, make_config
from sklearn.model_selection import train_test_split

from sweeper.provenance import config_hash
from sweeper.store import SCHEMA_VERSION, Store
from trainers.catalog import DataConfig
from trainers.config import RunConfig
from trainers.data import build_data
from trainers.digits import digits_split
from trainers.registry import ConfigError
from trainers.split import validation_split


def _images(loader) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    return loader.images.cpu(), loader.labels.cpu()


# ------------------------------------------------------------------------- the split
def test_digits_split_is_sklearns_stratified_split_fixed_by_the_data_seed() -> None:
    x_train, _, y_train, _ = digits_split(0)
    ref_keep, ref_val = train_test_split(np.arange(len(y_train)), test_size=0.2, random_state=0,
                                         stratify=y_train)  # fmt: skip
    keep, val = validation_split(y_train, 0.2, 0)
    assert np.array_equal(val, np.sort(ref_val)) and np.array_equal(keep, np.sort(ref_keep))
    # stratified: each class held out in proportion (within one image)
    for c, n in zip(*np.unique(y_train, return_counts=True), strict=True):
        assert abs((y_train[val] == c).sum() - 0.2 * n) < 1
    a = build_data(DataConfig(name="digits", val_split=0.2), 64, seed=0)
    b = build_data(DataConfig(name="digits", val_split=0.2), 64, seed=1)
    other = build_data(DataConfig(name="digits", val_split=0.2, data_seed=1), 64, seed=0)
    xa, ya = _images(a.val)
    assert (a.num_train, a.num_val, len(ya)) == (1437 - 288, 288, 288)
    assert torch.equal(xa, torch.from_numpy(x_train[val])) and torch.equal(
        ya, torch.from_numpy(y_train[val])
    )
    assert torch.equal(xa, _images(b.val)[0])  # the run seed does not choose it
    assert not torch.equal(xa, _images(other.val)[0])  # the data seed does
    # disjoint: the kept images are exactly the rest, in their order
    assert torch.equal(_images(a.train)[0], torch.from_numpy(x_train[keep]))
    assert len(set(keep) | set(val)) == len(y_train) and not set(keep) & set(val)
    # without a split nothing changes
    plain = build_data(DataConfig(name="digits"), 64, seed=0)
    assert plain.val is None and plain.num_train == 1437
    assert torch.equal(_images(plain.train)[0], torch.from_numpy(x_train))


def test_synthetic_and_custom_data_hold_out_a_split(tmp_path: Path,
                                                                      monkeypatch) -> None:  # fmt: skip
    syn = build_data(DataConfig(name="synthetic", num_train=200, val_split=0.25), 16, seed=0)
    full = build_data(DataConfig(name="synthetic", num_train=200), 16, seed=0)
    assert (syn.num_train, syn.num_val) == (150, 50)
    assert torch.bincount(syn.val.labels, minlength=10).tolist() == [5] * 10
    full_rows = {bytes(x.numpy()) for x in full.train.images}
    kept = {bytes(x.numpy()) for x in syn.train.images}
    held = {bytes(x.numpy()) for x in syn.val.images}
    assert not kept & held and kept | held == full_rows

    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def make(n=40):\n"
        "    x = (np.arange(n * 4) % 251).astype(np.uint8).reshape(n, 1, 2, 2)\n"
        "    y = np.arange(n) % 4\n"
        "    return x, y, x[:8], y[:8]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = build_data(DataConfig(_target_="mydata.make", val_split=0.5), 4, seed=0)
    assert (own.num_train, own.num_val) == (20, 20)
    assert torch.bincount(own.val.labels).tolist() == [5] * 4


@pytest.mark.slow
def test_cifar_files_and_an_imagefolder_tree_hold_out_a_split(tmp_path: Path) -> None:
    write_cifar10(tmp_path)  # 100 training images in the real python format
    cif = build_data(DataConfig(name="cifar10", root=str(tmp_path), val_split=0.3), 8, seed=0)
    ytr = torch.cat([cif.train.labels, cif.val.labels])
    assert cif.num_train + cif.num_val == 100 and cif.num_val == 30
    assert set(cif.val.labels.tolist()) == set(ytr.tolist())  # every class on both sides

    root = tmp_path / "inet"
    write_imagefolder(root, {"train": {"ant": 4, "bee": 4, "cat": 4},
                             "val": {"ant": 1, "bee": 1, "cat": 1}})  # fmt: skip
    inet = build_data(DataConfig(name="imagenet", root=str(root), image_size=16, num_workers=0,
                                 val_split=0.25), 2, seed=0)  # fmt: skip
    tr, va = inet.train.data.folder, inet.val.data.folder
    assert (inet.num_train, inet.num_val, inet.num_test) == (9, 3, 3)
    assert sorted(va.targets) == [0, 1, 2] and not {p for p, _ in tr.samples} & {
        p for p, _ in va.samples
    }
    x, y = next(inet.val.batches(0))  # transformed like the test set: resized and cropped
    assert tuple(x.shape) == (2, 3, 16, 16)


def test_a_split_that_empties_a_class_is_refused() -> None:
    y = np.array([0] * 10 + [1] * 2)
    with pytest.raises(ConfigError, match=r"data.val_split=0.9 leaves class 1 \(2 training images\) "
                       "with no training image"):  # fmt: skip
        validation_split(y, 0.9, 0)
    with pytest.raises(ConfigError, match="leaves class 1 .* with no validation image"):
        validation_split(y, 0.05, 0)


# ------------------------------------------------------------------------ identities
def test_identity_holds_the_split_only_when_set() -> None:
    base = RunConfig(data=DataConfig(name="digits"))
    held = RunConfig(data=DataConfig(name="digits", val_split=0.2))
    assert "val_split" not in base.identity("fp32")["data"]
    assert held.identity("fp32")["data"]["val_split"] == 0.2
    assert config_hash(held.identity("fp32")) != config_hash(base.identity("fp32"))
    # the MLflow dataset input: another digest with a split, the same one without
    from trainers.catalog.data import data_identity, dataset_ref

    plain = dataset_ref(data_identity(base.data))
    split = dataset_ref(data_identity(held.data))
    assert plain.digest == dataset_ref(data_identity(DataConfig(name="digits"))).digest
    assert split.digest != plain.digest and "num_val" not in plain.profile
    assert (split.profile["num_train"], split.profile["num_val"]) == (1149, 288)
    own = RunConfig(data=DataConfig(_target_="m.f", args={"n": 3}))
    assert own.identity("fp32")["data"] == {"_target_": "m.f", "n": 3}
    own.data.val_split, own.data.data_seed = 0.1, 4
    assert own.identity("fp32")["data"] == {"_target_": "m.f", "n": 3, "val_split": 0.1,
                                            "data_seed": 4}  # fmt: skip


# --------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_digits_run_records_val_metrics_of_its_held_out_images(tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = train("epochs=2", "data.val_split=0.2", "mlflow.enabled=false", f"results_dir={res}")
    assert out.status == "done"
    db = res / "results.db"
    rows = sql(db, "SELECT epoch, val_acc, val_loss FROM epoch_metrics ORDER BY epoch")
    assert [r[0] for r in rows] == [0, 1] and all(0 <= a <= 100 and b > 0 for _, a, b in rows)
    ((run_acc, run_loss, run_dir),) = sql(db, "SELECT val_acc, val_loss, run_dir FROM runs")
    assert (run_acc, run_loss) == rows[-1][1:]
    # independently: the held-out images by scikit-learn, normalised with the kept images'
    # statistics, through the final checkpoint's weights
    from trainers.catalog import ModelConf
    from trainers.models import build_model_from

    x_train, _, y_train, _ = digits_split(0)
    keep, val = train_test_split(np.arange(len(y_train)), test_size=0.2, random_state=0,
                                 stratify=y_train)  # fmt: skip
    kept = x_train[keep].astype(np.float64) / 255
    mean, std = kept.mean(), kept.std()
    x = torch.from_numpy(((x_train[val] / 255 - mean) / std).astype(np.float32))
    y = torch.from_numpy(y_train[val]).long()
    model = build_model_from(ModelConf(name="digits_cnn"), 10, 1)
    ck = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        z = model(x)
    acc = 100.0 * (z.argmax(1) == y).sum().item() / len(y)
    loss = torch.nn.functional.cross_entropy(z, y).item()
    assert run_acc == pytest.approx(acc, abs=1e-9) and run_loss == pytest.approx(loss, rel=1e-4)


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("args", "says"),
    [(["data.val_split=1.5"], "data.val_split=1.5 is not allowed; expected a fraction in [0, 1)"),
     (["data.val_split=-0.1"], "data.val_split=-0.1 is not allowed"),
     (["data=synthetic", "data.num_train=30", "batch_size=8", "data.val_split=0.01"],
      "data.val_split=0.01 leaves class 0 (3 training images) with no validation image")],
)  # fmt: skip
def test_a_bad_split_is_one_line_exit_2_nothing_written(args: list[str], says: str,
                                                        tmp_path: Path, capsys, monkeypatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process([*args, "epochs=1", "mlflow.enabled=false"], capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and says in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- the store
def test_an_old_store_gains_the_columns_and_reports_on_test(tmp_path: Path) -> None:
    res = tmp_path / "results"
    shutil.copytree(REPO / "tests" / "fixtures" / "store_v3", res)
    db = res / "results.db"
    assert "val_acc" not in {r[1] for r in sql(db, "PRAGMA table_info(runs)")}
    Store(f"sqlite:///{db}").engine.dispose()
    for table in ("runs", "epoch_metrics"):
        cols = {r[1] for r in sql(db, f"PRAGMA table_info({table})")}
        assert {"val_acc", "val_loss"} <= cols
    assert sql(db, "SELECT schema_version FROM store_info") == [(SCHEMA_VERSION,)]
    # schema 7: every older sweep is nobody's resolve sweep
    assert sql(db, "SELECT count(*), count(parent_id) FROM sweeps")[0][1] == 0
    assert sql(db, "SELECT count(*) FROM runs WHERE val_acc IS NOT NULL") == [(0,)]


# ------------------------------------------------------------------------ the report
def _verdict_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_report_chooses_alpha_on_val_when_every_run_has_it(tmp_path: Path, capsys) -> None:
    """α=0.1 is best on validation, α=0.5 on test: the table shows α=0.1 with its test
    result, and says where it was chosen; a table with one run lacking val chooses on test."""
    from analysis.__main__ import main

    def store(root: Path, val_for_all: bool) -> Path:
        root.mkdir()
        s = Store(f"sqlite:///{root / 'results.db'}")
        for seed in (0, 1, 2):
            for method, alpha, test, val in (("baseline", 0.25, 80.0, 79.0),
                                             ("pgt", 0.1, 80.5, 82.0),
                                             ("pgt", 0.5, 81.5, 80.0)):  # fmt: skip
                cfg = make_config(method, alpha, epochs=3, seed=seed, data__val_split=0.2)
                has = val_for_all or method != "baseline" or seed
                add_run(s, cfg, test=test + seed * 0.1, val_acc=val + seed * 0.1 if has else None,
                        val_loss=0.5 if has else None)  # fmt: skip
        s.engine.dispose()
        return root

    for val_for_all, split, best in ((True, "val", "0.1"), (False, "test", "0.5")):
        res = store(tmp_path / split, val_for_all)
        assert main(["--results-dir", str(res), "--formats", "md,csv"]) == 0
        capsys.readouterr()
        rows = [r for r in _verdict_rows(res / "report" / "verdicts.csv")
                if r["table"] == "table1_baseline_vs_pgt"]  # fmt: skip
        assert rows and {r["selected_on"] for r in rows} == {split}
        t1 = _verdict_rows(res / "report" / "table1_baseline_vs_pgt.csv")
        pgt = [r for r in t1 if r["method"] == "pgt"]
        assert {r["alpha"] for r in pgt} == {best}  # one row per metric, all of one α
        # the chosen α's test result is what the table states
        mean = next(float(r["mean"]) for r in pgt if r["metric"] == "test_acc")
        assert mean == pytest.approx((80.5 if best == "0.1" else 81.5) + 0.1)
        md = (res / "report" / "report.md").read_text()
        said = "α chosen on the validation split" if split == "val" else "α chosen on the test set"
        assert said in md


def test_val_metrics_are_a_search_metric_only_with_a_split(tmp_path: Path, capsys,
                                                           monkeypatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process(["-m", "hydra/sweeper=optuna", "+experiment=smoke",
                                   "alpha=interval(0.01,1)", "hydra.sweeper.metric=val_acc"],
                                  capsys, monkeypatch)  # fmt: skip
    assert code == 2 and len(lines) == 1, lines
    assert "hydra.sweeper.metric=val_acc needs a validation split" in lines[0]
    assert not list(tmp_path.rglob("results.db"))


def test_cifar_and_imagefolder_splits_are_checked_before_anything_is_written(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Their labels are read without torch by the pre-flight: one line, exit 2, no store."""
    data = tmp_path / "data"
    data.mkdir()
    write_cifar10(data)
    write_imagefolder(data / "inet", {"train": {"ant": 1, "bee": 3}, "val": {"ant": 1}})
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    for args, says in (
        (["data=cifar10", f"data.root={data}", "data.val_split=0.99"], "with no training image"),
        (["data=imagenet", f"data.root={data / 'inet'}", "data.val_split=0.5"],
         "leaves class ant (1 training image) with no"),
    ):  # fmt: skip
        code, lines = main_in_process([*args, "epochs=1", "batch_size=1", "mlflow.enabled=false"],
                                      capsys, monkeypatch)  # fmt: skip
        assert code == 2 and len(lines) == 1 and says in lines[0], lines
        assert list(run.iterdir()) == []


def test_the_notebook_refuses_an_unknown_split(tmp_path: Path) -> None:
    from analysis.errors import AnalysisError
    from analysis.notebook import verdicts

    (tmp_path / "r").mkdir()
    Store(f"sqlite:///{tmp_path / 'r' / 'results.db'}").engine.dispose()
    with pytest.raises(AnalysisError, match="select_on='train' is not allowed; expected auto"):
        verdicts(tmp_path / "r", select_on="train")

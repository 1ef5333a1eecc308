"""A researcher's own method from their own module: ``_target_`` pieces, a search path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose, main_in_process, run_cli, sql, train

from sweeper.config.identity import identity_of
from trainers.custom import bound_grads, check_method
from trainers.methods import apply_grad_transforms_, pgt_cross_entropy

GRADS = '''
"""Gradient centralization (Yong et al., ECCV 2020) and a transform that breaks."""
import torch

calls = 0


@torch.no_grad()
def centralize_(params, strength: float = 1.0):
    """Subtract from each conv/linear weight gradient its mean over all but the output dim."""
    for p in params:
        if p.grad is not None and p.grad.ndim > 1:
            p.grad.sub_(strength * p.grad.mean(dim=tuple(range(1, p.grad.ndim)), keepdim=True))


@torch.no_grad()
def explode_(params, at_step: int = 3):
    """Makes every gradient infinite at its at_step-th call (0-based)."""
    global calls
    if calls == at_step:
        for p in params:
            p.grad.fill_(float("inf"))
    calls += 1


def scaled_ce(logits, targets, alpha, scale: float = 1.0):
    return scale * torch.nn.functional.cross_entropy(alpha * logits, targets)


not_a_function = 3


def wrong_signature(params, *, other):
    pass
'''

CENTRALIZE = """
name: centralize
grad:
  _target_: mylab.grads.centralize_   # called in place after backward: fn(params, **knobs)
  strength: 1.0
"""


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: mylab/grads.py and mylab/conf/method/centralize.yaml, as the cwd."""
    (tmp_path / "mylab" / "conf" / "method").mkdir(parents=True)
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "grads.py").write_text(textwrap.dedent(GRADS))
    (tmp_path / "mylab" / "conf" / "method" / "centralize.yaml").write_text(CENTRALIZE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


SEARCH = "hydra.searchpath=[file://mylab/conf]"


def test_custom_piece_identity_name_and_gradient(lab: Path) -> None:
    cfg = compose("method=centralize", SEARCH, "method.pgt=true")
    spec = cfg.method.spec
    assert spec.name == "centralize_pgt" and cfg.effective_alpha() == 0.25
    ident, h = identity_of(cfg)
    assert ident["method"] == {
        "name": "centralize_pgt",
        "pgt_impl": "identity",
        "grad": [{"_target_": "mylab.grads.centralize_", "strength": 1.0}],
    }
    assert identity_of(compose("method=centralize", SEARCH, "method.pgt=true",
                               "method.grad.strength=0.5"))[1] != h  # fmt: skip
    # spelled inline, without the preset file: the same run
    inline = compose("method.grad={_target_: mylab.grads.centralize_, strength: 1.0}",
                     "method.pgt=true")  # fmt: skip
    assert identity_of(inline)[1] == h
    # with a built-in transform after it, in order
    both = compose("method.grad=[{_target_: mylab.grads.centralize_},znorm]", "method.pgt=true")
    assert both.method.spec.name == "centralize_znorm_pgt"
    check_method(spec)
    # the loop's function applies it after PGT's backward: centralised PGT gradients
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    net = net.double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    pgt_cross_entropy(net(x), y, 0.25).backward()
    raw = [p.grad.numpy().copy() for p in net.parameters()]
    params = list(net.parameters())
    apply_grad_transforms_(bound_grads(spec), params, params[:2], cfg.method)
    for p, g in zip(params, raw, strict=True):
        want = g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True) if g.ndim > 1 else g
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-12, atol=1e-15)
        if g.ndim > 1:
            assert np.abs(p.grad.numpy().mean(axis=1)).max() < 1e-15


@pytest.mark.slow
def test_custom_loss_and_custom_transform_in_training(lab: Path) -> None:
    res = lab / "res"
    out = train("method.loss={_target_: mylab.grads.scaled_ce, scale: 2.0}", "epochs=1",
                "alpha=0.5", f"results_dir={res}", "mlflow.enabled=false")  # fmt: skip
    assert out.status == "done"
    ((method, alpha, versions),) = sql(
        res / "results.db", "SELECT method, alpha, versions FROM runs"
    )
    assert method == "scaled_ce" and alpha == 0.5  # a custom loss receives alpha
    assert "source:mylab.grads.scaled_ce" in versions and "grads.py sha256:" in versions


def test_a_custom_transform_that_breaks_the_gradients_diverges_at_that_step(lab: Path) -> None:
    res = lab / "res"
    out = train("method.grad={_target_: mylab.grads.explode_, at_step: 7}", "epochs=1",
                "check_every=50", f"results_dir={res}", "mlflow.enabled=false")  # fmt: skip
    assert out.status == "diverged"
    assert sql(res / "results.db", "SELECT status, diverged_step FROM runs") == [("diverged", 7)]


@pytest.mark.slow
def test_worked_example_through_the_cli(lab: Path) -> None:
    """The docs' worked example (docs/methods.md), smaller: pgt, centralize and agc_pgt, one seed, 1 epoch, with
    the user's search path; the runs in the store, in the report, and status noticing an
    edited source file."""
    args = ["-m", "method=pgt,centralize,agc_pgt", "seed=0", "epochs=1", SEARCH,
            "mlflow.enabled=false", "hydra.launcher.max_parallel=2"]  # fmt: skip
    res = run_cli(*args, cwd=lab, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = sql(lab / "results" / "results.db", "SELECT method, status, versions FROM runs")
    assert sorted(m for m, _, _ in rows) == ["agc_pgt", "centralize", "pgt"]
    assert all(s == "done" for _, s, _ in rows)
    assert all(("source:mylab.grads.centralize_" in v) == (m == "centralize") for m, _, v in rows)
    rep = run_cli("--formats", "md,csv", module="analysis", cwd=lab)
    assert rep.returncode == 0, rep.stderr[-2000:]
    table2 = (lab / "results" / "report" / "table2_batch_size.csv").read_text().splitlines()
    rows = [ln.split(",") for ln in table2[1:]]  # long format: a row per method and metric
    assert list(dict.fromkeys(r[5] for r in rows)) == ["baseline", "agc_pgt", "centralize", "pgt"]
    (n,) = {r[10] for r in rows if r[5] == "centralize" and r[7] == "test_acc"}
    assert n == "1"  # its one seed
    again = run_cli(*args, cwd=lab, timeout=300)
    assert "3 points, 0 to run, 3 already finished" in again.stdout
    assert "another version" not in run_cli("status", cwd=lab).stdout
    with (lab / "mylab" / "grads.py").open("a") as f:
        f.write("# tuned\n")
    st = run_cli("status", cwd=lab).stdout.replace("\n", " ")
    assert st.count("was made by another version of mylab.grads.centralize_") == 1


BAD = [
    ("method.grad={_target_: mylab.nothere.f}", "cannot import mylab.nothere"),
    ("method.grad={_target_: mylab.grads.nope}", "mylab.grads has no 'nope'"),
    ("method.grad={_target_: mylab.grads.not_a_function}", "is not callable (its type is int)"),
    ("method.grad={_target_: mylab.grads.wrong_signature}", "cannot be called as fn(params)"),
    ("method.grad={_target_: mylab.grads.centralize_, power: 2}", "unexpected keyword"),
    ("method.grad={_target_: mylab.grads.centralize_, strength: abc}", "expected a number"),
    ("method.loss={_target_: mylab.grads.centralize_}", "fn(logits, targets, alpha)"),
    ("method.grad={_target_: centralize}", "expected a dotted name"),
    ("method=centralise", "known: agc, agc_pgt, baseline, centralize"),
]


def _refused(args: list[str], real: bool, capsys, monkeypatch) -> list[str]:  # noqa: ANN001
    """The CLI's exit status and stderr lines for ``args``: through a real process (where
    the process itself is checked once per kind of input) or the same entry in process."""
    if real:
        res = run_cli(*args, cwd=Path.cwd())
        assert res.returncode == 2, res.stderr[-2000:]
        return [ln for ln in res.stderr.splitlines() if ln.strip()]
    code, lines = main_in_process(args, capsys, monkeypatch)
    assert code == 2, lines
    return lines


@pytest.mark.parametrize(("arg", "named"), BAD, ids=[b[0] for b in BAD])
def test_bad_custom_pieces_one_line_exit_2_no_store(lab: Path, arg: str, named: str, capsys,
                                                    monkeypatch) -> None:  # fmt: skip
    lines = _refused([arg, SEARCH], arg == BAD[0][0], capsys, monkeypatch)
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not (lab / "results").exists()


# ------------------------------------------------------- your own model and data set
NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x):
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), (4, 1))
        return self.fc(h.flatten(1))


def no_fc(num_classes: int):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def rgb_only(num_classes: int):
    net = TinyNet(num_classes, 3)
    return net


def bars(n_train: int = 256, n_test: int = 64, seed: int = 0):
    """Class k: a bright horizontal bar in row 2k of an 8x8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
        for i in range(n):
            x[i, 0, 2 * y[i]] += 190
        return x.to(torch.uint8), y

    return (*make(n_train), *make(n_test))


def floats():
    x = torch.rand(8, 1, 8, 8)
    y = torch.zeros(8, dtype=torch.long)
    return x, y, x, y
'''


@pytest.fixture
def nets(lab: Path) -> Path:
    (lab / "mylab" / "nets.py").write_text(textwrap.dedent(NETS))
    return lab


def test_your_own_model_and_data_set(nets: Path) -> None:
    res = nets / "res"
    args = ["model._target_=mylab.nets.TinyNet", "model.args={width: 16}",
            "data._target_=mylab.nets.bars", "data.args={n_train: 256}", "epochs=6", "lr=0.8",
            "batch_size=32", f"results_dir={res}", "mlflow.enabled=false"]  # fmt: skip
    cfg = compose(*args)
    ident, h = identity_of(cfg)
    assert ident["model"] == {"_target_": "mylab.nets.TinyNet", "width": 16}
    assert ident["data"] == {"_target_": "mylab.nets.bars", "n_train": 256}
    assert identity_of(compose(*args[:1], "model.args={width: 8}", *args[2:]))[1] != h
    out = train(*args)
    assert out.status == "done"
    ((model, data, acc),) = sql(res / "results.db", "SELECT model, data, test_acc FROM runs")
    assert (model, data) == ("TinyNet", "bars") and acc > 90.0, acc
    # the built-in models and data keep their identity (no _target_ keys in it)
    assert identity_of(compose())[0]["model"] == "digits_cnn"
    assert "_target_" not in identity_of(compose())[0]["data"]


def test_a_torchvision_constructor_as_the_model(nets: Path) -> None:
    res = nets / "res"
    out = train("model._target_=torchvision.models.resnet18", "data=synthetic",
                "data.num_train=64", "data.num_test=32", "batch_size=32", "epochs=1",
                f"results_dir={res}", "mlflow.enabled=false")  # fmt: skip
    assert out.status == "done"
    assert sql(res / "results.db", "SELECT model, status FROM runs") == [("resnet18", "done")]


BAD_MODELS = [
    (["model._target_=mylab.nets.no_fc"], "has no nn.Linear attribute 'fc'"),
    (
        ["model._target_=mylab.nets.rgb_only"],
        "cannot take a batch of the data's shape (2, 1, 8, 8)",
    ),
    (["model._target_=mylab.nets.TinyNet", "model.args={depth: 3}"], "unexpected keyword"),
    (["model._target_=mylab.nope.Net"], "cannot import mylab.nope"),
    (["data._target_=mylab.nets.floats"], "expected uint8 N x C x H x W"),
    (["data._target_=mylab.nets.bars", "data.args={colour: red}"], "unexpected keyword"),
]


@pytest.mark.parametrize(("args", "named"), BAD_MODELS, ids=[" ".join(a) for a, _ in BAD_MODELS])
def test_bad_models_and_data_one_line_exit_2_no_store(nets: Path, args: list, named: str, capsys,
                                                      monkeypatch) -> None:  # fmt: skip
    real = args == BAD_MODELS[0][0]
    lines = _refused([*args, "mlflow.enabled=false"], real, capsys, monkeypatch)
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert sql(nets / "results" / "results.db", "SELECT count(*) FROM runs") in ([], [(0,)])

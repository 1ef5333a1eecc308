"""The ``optimizer`` group: SGD stays the paper's (same hashes); AdamW is AdamW, exactly."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose, sql, train
from torch import nn

from analysis.tables import build_tables
from sweeper.config.identity import identity_of
from sweeper.store import RunRecord, RunStatus
from trainers.runtime import build_optimizer


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()


def test_sgd_is_the_default_and_adds_nothing_to_the_identity() -> None:
    cfg = compose()
    assert cfg.optimizer.name == "sgd"
    ident, _ = identity_of(cfg)
    assert "optimizer" not in ident and ident["momentum"] == 0.9 and ident["nesterov"] is True
    opt = build_optimizer(cfg, _tiny(), lr=0.05)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups
    assert [x["weight_decay"] for x in g] == [5e-4, 0.0]
    assert all(x["momentum"] == 0.9 and x["nesterov"] and x["lr"] == 0.05 for x in g)
    assert [p.ndim > 1 for p in g[0]["params"]] == [True, True]  # conv and linear weights
    assert [p.ndim for p in g[1]["params"]] == [1, 1]  # their biases: no decay


def test_adamw_preset_and_its_identity() -> None:
    cfg = compose("optimizer=adamw")
    assert (cfg.lr, cfg.lr_scaling, cfg.weight_decay) == (1e-3, "none", 0.05)
    assert cfg.resolved_lr() == 1e-3  # no batch scaling: the same lr at batch 64 or 1024
    ident, h = identity_of(cfg)
    assert ident["optimizer"] == {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8}
    assert "momentum" not in ident and "nesterov" not in ident  # SGD's knobs mean nothing here
    assert identity_of(compose())[1] != h
    # explicit defaults are the same run; a different beta is another
    assert identity_of(compose("optimizer=adamw", "optimizer.betas=[0.9,0.999]"))[1] == h
    assert identity_of(compose("optimizer=adamw", "optimizer.betas=[0.8,0.999]"))[1] != h
    # the command line wins over the group's lr; momentum is not part of an AdamW run
    assert compose("optimizer=adamw", "lr=3e-4").resolved_lr() == 3e-4
    assert identity_of(compose("optimizer=adamw", "momentum=0.5"))[1] == h


def test_adamw_steps_equal_the_formula_and_torch() -> None:
    """Four steps on fixed gradients: our optimiser (as the trainer builds it) against the
    AdamW update written out (decoupled decay on weights only, bias-corrected moments), and
    against torch.optim.AdamW given the same groups by hand; CPU float64."""
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.8, 0.99), 1e-6
    cfg = compose("optimizer=adamw", "optimizer.betas=[0.8,0.99]", "optimizer.eps=1e-6",
                  f"weight_decay={wd}")  # fmt: skip
    model = _tiny()
    ref = copy.deepcopy(model)
    ours = build_optimizer(cfg, model, lr=lr)
    assert isinstance(ours, torch.optim.AdamW)
    theirs = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.ndim > 1], "weight_decay": wd},
         {"params": [p for p in ref.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
        lr=lr, betas=(b1, b2), eps=eps,
    )  # fmt: skip
    want = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in want]
    v = [torch.zeros_like(p) for p in want]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 5):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in want]
        for net in (model, ref):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
        ours.step()
        theirs.step()
        for i, g in enumerate(grads):
            decay = wd if want[i].ndim > 1 else 0.0
            want[i] = want[i] * (1 - lr * decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            want[i] = want[i] - lr * m_hat / (v_hat.sqrt() + eps)
    for p, w, r in zip(model.parameters(), want, ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=0)


def test_an_adamw_run_trains_and_is_recorded(tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = train("optimizer=adamw", "epochs=3", f"results_dir={res}", "mlflow.enabled=false")
    assert out.status == "done"
    ((lr, acc, config),) = sql(res / "results.db", "SELECT lr, test_acc, config FROM runs")
    assert lr == 1e-3 and acc > 90.0, acc
    assert '"optimizer": {"name": "adamw"' in config
    losses = [r[0] for r in sql(res / "results.db", "SELECT train_loss FROM epoch_metrics")]
    assert losses == sorted(losses, reverse=True) and len(losses) == 3


def test_the_report_compares_each_optimizer_with_its_own_baseline() -> None:
    def run(i: int, method: str, opt: str, acc: float) -> RunRecord:
        return RunRecord(
            id=i, config_hash=f"{i:064d}", model="digits_cnn", method=method,
            alpha=0.25 if method == "pgt" else None, data="digits", batch_size=64, epochs=3,
            lr=0.1, schedule="cosine", seed=i % 2, status=RunStatus.done, train_acc=100.0,
            test_acc=acc, config={"optimizer": {"name": opt}} if opt != "sgd" else {},
        )  # fmt: skip

    runs = [run(0, "baseline", "sgd", 90.0), run(1, "baseline", "sgd", 92.0),
            run(2, "pgt", "sgd", 95.0), run(3, "pgt", "sgd", 97.0),
            run(4, "baseline", "adamw", 80.0), run(5, "baseline", "adamw", 82.0),
            run(6, "pgt", "adamw", 84.0), run(7, "pgt", "adamw", 86.0)]  # fmt: skip
    (t1, t2, t3), _ = build_tables(runs)
    assert "optimizer" in t2.key_columns and "optimizer" in t3.key_columns
    rows = {(r.keys["optimizer"], r.keys["method"]): r for r in t2.rows}
    assert rows[("adamw", "baseline")].stats["test_acc"].mean == pytest.approx(81.0)
    pgt = rows[("adamw", "pgt")]
    assert pgt.stats["test_acc"].mean == pytest.approx(85.0)
    assert pgt.diffs["test_acc"].diff == pytest.approx(4.0)  # vs the AdamW baseline (81)
    assert rows[("sgd", "pgt")].diffs["test_acc"].diff == pytest.approx(5.0)  # vs SGD's (91)
    # an SGD-only store keeps the paper's columns
    (s1, s2, s3), _ = build_tables([r for r in runs if r.optimizer == "sgd"])
    assert "optimizer" not in s2.key_columns and "optimizer" not in s3.key_columns
    assert dataclasses.replace(runs[0], config={}).optimizer == "sgd"


def _steps(opt: torch.optim.Optimizer, model: nn.Module, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_our_optimisers_are_torchs_bit_for_bit_and_share_its_state_dict(opt_name: str) -> None:
    """What the trainer builds steps exactly as torch.optim's class given the same groups
    (float32, every bit), and their state dicts load into each other: a checkpoint written
    by either resumes in the other to the same parameters."""
    cfg = compose(f"optimizer={opt_name}", "weight_decay=0.01")
    model = _tiny().float()
    ref = copy.deepcopy(model)
    ours = build_optimizer(cfg, model, lr=0.05)
    groups = [{"params": [p for p in ref.parameters() if p.ndim > 1], "weight_decay": 0.01},
              {"params": [p for p in ref.parameters() if p.ndim <= 1], "weight_decay": 0.0}]  # fmt: skip
    cls = torch.optim.AdamW if opt_name == "adamw" else torch.optim.SGD
    kw = {"momentum": 0.9, "nesterov": True} if opt_name == "sgd" else {}
    theirs = cls(groups, lr=0.05, **kw)
    assert type(ours) is not cls and isinstance(ours, cls)
    _steps(ours, model, 5, seed=3)
    _steps(theirs, ref, 5, seed=3)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)
    assert all(p.grad is not None for p in model.parameters())
    ours.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # swap state dicts (and parameters) and go on: still equal
    a, b = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    assert a["param_groups"] == b["param_groups"]
    ours.load_state_dict(b)
    theirs.load_state_dict(a)
    _steps(ours, model, 3, seed=4)
    _steps(theirs, ref, 3, seed=4)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)


def test_a_job_building_and_stepping_its_optimiser_does_not_import_dynamo() -> None:
    """torch.optim's own entry points import torch._dynamo (about as much CPU as torch
    itself) on first use; a job's optimiser must not, through any path a job takes."""
    code = """
import sys, torch
from torch import nn
from trainers.runtime import SGD, AdamW
for cls, kw in ((SGD, {"momentum": 0.9, "nesterov": True}), (AdamW, {})):
    m = nn.Linear(3, 2)
    opt = cls([{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias]}], lr=0.1, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5)
    for _ in range(2):
        m(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", res.stdout + res.stderr

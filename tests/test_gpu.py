"""CUDA paths: bf16 / fp16 (GradScaler) / fp32 training, channels-last, compile, PGT on GPU.

Skipped cleanly where no CUDA device is present (CI); run on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import MethodConf, ModelConf, RunConfig
from trainers.data import DataConfig
from trainers.methods import adaptive_clip_grad_, pgt_cross_entropy
from trainers.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cfg(**kw: object) -> RunConfig:
    base = dict(
        model=ModelConf("digits_cnn"),
        data=DataConfig(name="digits"),
        epochs=8,
        device="cuda",
        filter_stats_every=20,
    )
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("method", ["agc_pgt", "ls_pgt", "gc", "znorm"])
def test_training_on_cuda(precision: str, method: str, tmp_path: Path) -> None:
    t = Trainer(
        _cfg(
            precision=precision,
            method=MethodConf.preset(
                method, label_smoothing=0.1 if method.startswith("ls") else 0.0
            ),
        ),
        tmp_path,
    )
    r = t.fit()
    assert r.status == "done" and r.device.startswith("cuda") and r.precision == precision
    assert r.final is not None and r.final.test_acc > 90.0, r.final
    assert next(t.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("mode", ["auto", "default"])  # auto on one GPU: CUDA graphs
def test_compiled_step_matches_eager_closely(mode: str, tmp_path: Path) -> None:
    eager = Trainer(_cfg(precision="fp32", epochs=3), tmp_path / "e").fit()
    t = Trainer(_cfg(precision="fp32", epochs=3, compile=True, compile_mode=mode), tmp_path / "c")
    comp = t.fit()
    assert t.compile_mode == ("reduce-overhead" if mode == "auto" else "default")
    assert comp.status == "done"
    assert comp.final.test_acc == pytest.approx(eager.final.test_acc, abs=1.0)
    for a, b in zip(comp.history, eager.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-3)


def test_peak_memory_is_recorded_per_epoch(tmp_path: Path) -> None:
    r = Trainer(_cfg(epochs=2), tmp_path).fit()
    peaks = [m.peak_mem_mb for m in r.history]
    assert all(p is not None and 0 < p < torch.cuda.get_device_properties(0).total_memory / 2**20
               for p in peaks), peaks  # fmt: skip


def test_segmented_agc_in_training_equals_per_tensor(tmp_path: Path, monkeypatch) -> None:
    """AGC's CUDA implementation (auto) and the per-tensor one give the same run."""
    import trainers.train as train_mod
    from trainers.methods import adaptive_clip_grad_ as agc

    cfg = dict(precision="fp32", epochs=2, method=MethodConf.preset("agc"))
    seg = Trainer(_cfg(**cfg), tmp_path / "s").fit()
    monkeypatch.setattr(train_mod, "adaptive_clip_grad_",
                        lambda ps, c, e: agc(ps, c, e, impl="per_tensor"))  # fmt: skip
    per = Trainer(_cfg(**cfg), tmp_path / "p").fit()
    for a, b in zip(seg.history, per.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-4)


def test_resnet50_channels_last_bf16_step(tmp_path: Path) -> None:
    cfg = RunConfig(
        model=ModelConf("resnet50"),
        method=MethodConf.preset("agc_pgt"),
        data=DataConfig(name="synthetic", image_size=64, num_train=256, num_test=64),
        epochs=1,
        batch_size=64,
        device="cuda",
        filter_stats_every=2,
    )
    r = Trainer(cfg, tmp_path).fit()
    assert r.status == "done" and r.precision == "bf16"


def test_pgt_gradient_on_cuda_bf16_matches_formula() -> None:
    torch.manual_seed(0)
    z = (torch.randn(256, 1000, device="cuda") * 3).bfloat16().requires_grad_(True)
    y = torch.randint(0, 1000, (256,), device="cuda")
    scale = 65536.0
    (pgt_cross_entropy(z, y, 0.05) * scale).backward()
    z64 = z.detach().double().cpu().numpy()
    e = np.exp(0.05 * z64 - (0.05 * z64).max(1, keepdims=True))
    want = scale * (e / e.sum(1, keepdims=True) - np.eye(1000)[y.cpu().numpy()]) / 256
    np.testing.assert_allclose(z.grad.double().cpu().numpy(), want, rtol=2**-7, atol=1e-6 * scale)


def test_agc_cuda_equals_cpu() -> None:
    torch.manual_seed(1)
    shapes = [(64, 3, 7, 7), (64, 64, 3, 3), (64, 64, 3, 3), (256, 64, 1, 1), (64,), (64,)]
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in cpu:
        p.grad = torch.randn_like(p) * 0.05
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    for p, q in zip(gpu, cpu, strict=True):
        p.grad = q.grad.cuda()
    adaptive_clip_grad_(cpu)
    adaptive_clip_grad_(gpu)
    for p, q in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_stacked_group_on_cuda_matches_its_separate_runs(precision: str, tmp_path: Path) -> None:
    """The CUDA default (stacked: one vmapped forward/backward for the group) against each
    member alone, on the GPU: first-epoch losses within 1e-4 (fp32) or 1e-2 (bf16)."""
    from trainers.fused import FusedTrainer

    cfgs = [_cfg(method=MethodConf.preset(m), seed=s, precision=precision, epochs=1)
            for s, m in ((0, "baseline"), (1, "agc_pgt"), (2, "gc"))]  # fmt: skip
    alone = [Trainer(c, tmp_path / f"a{i}", log=lambda s: None).fit() for i, c in enumerate(cfgs)]
    members = [Trainer(c, tmp_path / f"f{i}", log=lambda s: None) for i, c in enumerate(cfgs)]
    ft = FusedTrainer(members, log=lambda s: None)
    assert ft.stacked  # the default on CUDA
    fused = ft.fit()
    tol = 1e-4 if precision == "fp32" else 1e-2
    for a, f in zip(alone, fused, strict=True):
        x, y = a.history[0].train_loss, f.history[0].train_loss
        assert abs(x - y) / abs(x) < tol


def test_a_cuda_run_logs_gpu_system_metrics(tmp_path: Path, monkeypatch) -> None:
    """mlflow.system_metrics=auto: a job on the GPU logs MLflow's GPU utilisation and memory
    (NVML), besides CPU and memory. Skipped where MLflow is not installed (the wheelhouse
    of benchmarks/wheelhouse.py leaves it out)."""
    from helpers import compose

    MlflowClient = pytest.importorskip("mlflow").MlflowClient  # noqa: N806

    from sweeper.launch.job import run_job

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = compose(f"results_dir={tmp_path}", "device=cuda", "epochs=40")  # > 1 s
    out = run_job(cfg)
    assert out.status == "done"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    keys = set(run.data.metrics)
    assert "system/gpu_0_utilization_percentage" in keys, sorted(keys)
    assert "system/gpu_0_memory_usage_megabytes" in keys, sorted(keys)

"""DistributedDataParallel on CPU (gloo, 2 processes) equals one process on the same batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainers.config import MethodConf, ModelConf, RunConfig
from trainers.data import DataConfig
from trainers.train import Trainer

# No BatchNorm: PyTorch's SyncBatchNorm has no CPU kernel, and per-process BN statistics
# legitimately differ from one process's. The paper's non-BN ResNet-18 is the natural model.
CFG = dict(
    model=ModelConf("resnet18_nobn"),
    method=MethodConf("agc_pgt"),
    data=DataConfig(name="digits"),
    epochs=2,
    batch_size=32,
    lr=0.05,
    filter_stats_every=0,
    check_every=10,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    Trainer(RunConfig(**CFG), Path(run_dir), log=lambda _m: None).fit()  # type: ignore[arg-type]


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = Trainer(RunConfig(**CFG), tmp_path / "single", log=lambda _m: None).fit()  # type: ignore[arg-type]
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)

    a = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * (1437 // 32)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        # the training metrics are reduced over both processes
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-4)
        assert hb["train_acc"] == pytest.approx(ha["train_acc"], abs=0.1)
        assert hb["test_acc"] == pytest.approx(ha["test_acc"], abs=0.3)
        assert hb["test_loss"] == pytest.approx(ha["test_loss"], rel=1e-3)
    assert single.final is not None and single.final.test_acc > 20  # chance is 10 %

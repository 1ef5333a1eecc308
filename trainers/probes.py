"""What a run measures besides its loss: per-filter weight norms and the test set.

* Filter norms (the paper's Figs. 5-7, 14-17): the L2 norm of every output unit of every
  conv/linear weight, snapshot every ``filter_stats_every`` steps; per-layer summaries go to
  the store, the full vectors to ``<run_dir>/filter_norms/epoch_NNNN.npz``.
* Evaluation: test loss, top-1/top-5, the mean logit norm and, on the last epoch, the norm of
  each channel of the pooled feature vector entering the classifier.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.data import Loader
from trainers.files import naming
from trainers.records import ZERO_NORM, LayerFilterStats


def weight_layers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every conv/linear weight, in module order (1-based: the paper's layer ids)."""
    return [
        (name, m.weight)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


@dataclass
class FilterLog:
    """One epoch's filter-norm snapshots: per-layer summaries and the full vectors."""

    stats: list[LayerFilterStats] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)


class FilterNorms:
    """Snapshots of every filter's L2 norm; one .npz of full vectors per epoch."""

    def __init__(self, model: nn.Module, run_dir: Path) -> None:
        self.layers = weight_layers(model)
        self.run_dir = Path(run_dir)

    @torch.no_grad()
    def snapshot(self, log: FilterLog, step: int, epoch: int) -> None:
        norms = [
            w.detach().float().flatten(1).norm(dim=1) if w.dim() > 1 else w.detach().float().abs()
            for _, w in self.layers
        ]
        flat = torch.cat(norms).cpu()  # one device->host copy for all layers
        i = 0
        for idx, ((name, _), n) in enumerate(zip(self.layers, norms, strict=True), start=1):
            v = flat[i : i + n.numel()]
            i += n.numel()
            log.vectors.setdefault(f"L{idx:03d}", []).append(v.numpy())
            log.stats.append(
                LayerFilterStats(
                    step=step,
                    epoch=epoch,
                    layer_index=idx,
                    layer_name=name,
                    n_filters=v.numel(),
                    n_zero=int((v < ZERO_NORM).sum()),
                    min_norm=float(v.min()),
                    median_norm=float(v.median()),
                    max_norm=float(v.max()),
                )
            )
        log.steps.append(step)

    def write(self, epoch: int, log: FilterLog,
              before_replace: Callable[[], object] | None = None) -> Path | None:  # fmt: skip
        """Full per-filter norm vectors of this epoch's snapshots: one .npz per epoch.

        Arrays: ``steps`` (S,), ``L001`` ... (S, n_filters), ``names`` (layer names).
        ``before_replace`` runs once the file is written, just before it takes its name: it
        raises when the run is no longer this process's to write (a job stopped while
        writing and taken over meanwhile leaves no file of its own).
        """
        if not log.steps:
            return None
        d = self.run_dir / "filter_norms"
        d.mkdir(exist_ok=True)
        path = d / f"epoch_{epoch:04d}.npz"
        tmp = d / f".epoch_{epoch:04d}.tmp.npz"
        try:
            with naming(path):
                np.savez_compressed(
                    tmp,
                    steps=np.asarray(log.steps),
                    names=np.asarray([n for n, _ in self.layers]),
                    **{k: np.stack(v) for k, v in log.vectors.items()},
                )
            if before_replace is not None:
                before_replace()
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk or a lost run leaves no file
            raise
        os.replace(tmp, path)
        return path


@dataclass
class TestMetrics:
    loss: float  # plain mean CE
    top1: float  # percent
    top5: float  # percent
    logit_norm: float  # mean over test images of ||z||_2
    features: list[float] = field(default_factory=list)  # per pooled-feature channel

    def finite(self) -> bool:
        return bool(np.isfinite([self.loss, self.logit_norm]).all())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    fc: nn.Linear,
    test: Loader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool,
    want_features: bool,
) -> TestMetrics:
    """The whole test set once; with ``want_features`` the L2 norm over the test set of each
    channel of the pooled features (``fc``'s input, hooked)."""
    model.eval()
    n = 0
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device)
    lnorm = torch.zeros((), device=device)
    feat_sq: list[Tensor] = []

    def grab(_m: nn.Module, inp: tuple[Tensor, ...]) -> None:
        f = inp[0].float()  # (N, D) pooled features entering the classifier
        sq = (f * f).sum(0)
        if feat_sq:
            feat_sq[0] += sq
        else:
            feat_sq.append(sq)

    handle = fc.register_forward_pre_hook(grab) if want_features else None
    try:
        for x, y in test.batches(0):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x)
            z = logits.float()
            loss_sum += F.cross_entropy(z, y, reduction="sum")
            k = min(5, z.shape[1])
            hit = z.topk(k, dim=1).indices == y[:, None]
            top1 += hit[:, 0].sum()
            top5 += hit.any(1).sum()
            lnorm += z.norm(dim=1).sum()
            n += y.numel()
    finally:
        if handle is not None:
            handle.remove()
        model.train()
    feats = feat_sq[0].sqrt().cpu().tolist() if feat_sq else []
    return TestMetrics(
        loss_sum.item() / n,
        100.0 * top1.item() / n,
        100.0 * top5.item() / n,
        lnorm.item() / n,
        feats,
    )

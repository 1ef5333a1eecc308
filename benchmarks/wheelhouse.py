"""Build a wheelhouse of what the GPU check needs beyond torch, for a GPU machine that has
torch (and numpy) but reaches no package registry.

The GPU check (``benchmarks/gpu_check.py``) and the GPU tests (``tests/test_gpu.py``) need
gradsweep's sweeper and trainers -- Hydra, OmegaConf, submitit, SQLAlchemy, rich, psutil --
and pytest. This script collects those distributions and everything they require (read from
the installed packages' metadata, minus what the GPU machine brings: torch, torchvision,
triton, numpy, the CUDA libraries), puts their wheels into ``--out`` (default
``.whl/``, ignored by git) with pip, writes ``requirements.txt`` beside them, and checks the
total stays under 60 MiB. MLflow is left out (its server pulls in pandas and pyarrow): the
one GPU test that needs it skips itself without it. On the GPU machine, from the checkout::

    python3 -m pip install --no-index --find-links .whl --no-deps -r .whl/requirements.txt
    python3 -m pip install --no-index --find-links .whl --no-deps -e .

Usage (here, with the project's environment)::

    .venv/bin/python benchmarks/wheelhouse.py [--out .whl] [--list]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ["hydra-core", "omegaconf", "submitit", "sqlalchemy", "rich", "psutil", "pytest"]
# what the GPU machine brings with its torch
BROUGHT = re.compile(r"^(torch|torchvision|triton|numpy|nvidia-.*|cuda-.*|setuptools|pip)$")
LIMIT_MIB = 60.0


def _name(req: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> list[str]:
    """The installed distributions ``roots`` need (their requirements, transitively,
    without extras and without what the GPU machine brings), as ``name==version``."""
    seen: dict[str, str] = {}
    todo = [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or BROUGHT.match(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here (a platform marker)
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            marker = req.split(";", 1)[1] if ";" in req else ""
            if marker and "python_version" not in marker and "sys_platform" not in marker:
                continue
            todo.append(_name(req))
    return sorted(f"{n}=={v}" for n, v in seen.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / ".whl"), help="the wheelhouse folder (.whl)")
    ap.add_argument("--list", action="store_true", help="print what it holds, download nothing")
    a = ap.parse_args()
    reqs = closure(ROOTS)
    if a.list:
        print("\n".join(reqs))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    # pip wheel, not download: some of them (antlr4 4.9.3, which OmegaConf pins) are
    # published as source only, and the GPU machine cannot build them
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out),
           "-r", str(out / "requirements.txt")]  # fmt: skip
    subprocess.run(cmd, check=True)
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
    print(f"{len(reqs)} wheels in {out}: {size:.1f} MiB (limit {LIMIT_MIB:g} MiB)")
    if size > LIMIT_MIB:
        sys.exit(f"the wheelhouse is {size:.1f} MiB, over {LIMIT_MIB:g} MiB")


if __name__ == "__main__":
    main()

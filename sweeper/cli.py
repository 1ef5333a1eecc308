"""``python -m sweeper``: the thin Hydra entry (design.md §6.3).

Before Hydra starts (and creates its output directory), :func:`preflight_argv` composes
the same config through Hydra's compose API and runs every check that needs no training,
so bad input ends with one line ``error: ...`` and exit status 2, and nothing is written.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sweeper.schema import Config, register_configs
from trainers.registry import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "data", "schedule", "experiment")
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

log = logging.getLogger("gradsweep")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def to_config(cfg: DictConfig) -> Config:
    """The one boundary where a DictConfig becomes the typed Config."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def _one_line(e: Exception) -> str:
    """Hydra / OmegaConf errors are multi-line; keep what names the bad value."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    m = re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        known = ", ".join(k for k in Config.__dataclass_fields__)
        return f"unknown key {key or m.group(1)!r}; known top-level keys: {known}"
    m = re.search(r"Missing mandatory value: ?(\S+)", text)
    if m or "MissingMandatoryValue" in type(e).__name__:
        k = m.group(1) if m else key
        return f"{k} is required (no default); set it on the command line, e.g. {k}=/path"
    first = lines[0] if lines else type(e).__name__
    return f"{key}: {first}" if key and key not in first else first


def _check_group_choices(overrides: list[str]) -> None:
    """Unknown group options -> one line listing the known ones (Hydra prints a page)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(_one_line(e)) from None
    for ov in parsed:
        group = ov.key_or_group.lstrip("+~")
        if group not in GROUPS or ov.is_delete():
            continue
        values = (
            list(ov.sweep_string_iterator())
            if ov.is_sweep_override()
            else [ov.get_value_element_as_str()]
        )
        if not values:
            raise ConfigError(f"empty choice for {group}; known: {', '.join(group_options(group))}")
        known = group_options(group)
        for v in values:
            if v not in known:
                raise ConfigError(f"unknown {group} {v!r}; known: {', '.join(known)}")


def preflight_argv(argv: list[str]) -> Config | None:
    """Compose and validate a single run's config from the command line.

    Returns the typed Config, or None for a multirun (each point is checked by the
    sweeper). Raises ConfigError with a one-line message on bad input.
    """
    from hydra import compose, initialize_config_dir

    from sweeper.job import preflight

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [
        a
        for a in argv
        if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))
    ]
    _check_group_choices(overrides)
    if multirun:
        return None
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            dcfg = compose("config", overrides=overrides)
        cfg = to_config(dcfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf composition or type errors
        raise ConfigError(_one_line(e)) from None
    preflight(cfg)
    return cfg


def _task(dcfg: DictConfig) -> None:
    from sweeper.job import run_job

    try:
        cfg = to_config(dcfg)
        outcome = run_job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    if outcome.status in ("failed", "diverged"):
        sys.exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    register_configs()
    if not any(
        a
        in (
            "--help",
            "-h",
            "--hydra-help",
            "--info",
            "-i",
            "--cfg",
            "-c",
            "--shell-completion",
            "-sc",
        )
        for a in argv
    ):
        try:
            preflight_argv(argv)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()

"""What MLflow shows of a run: its params, its grouping tags, its outcome -- all from the
run's row in the results store (its recorded identity), so a job, the sweeper's mirror and
``python -m sweeper mirror`` describe a run the same way. No MLflow, no torch here.

* **params** (:func:`run_params`): the keys that define the run's result, as dotted config
  keys, and only those that matter for *this* run: the data set's own knobs
  (:mod:`trainers.catalog`: a digits run has no ``data.image_size``) with what the
  data set is (``data.images``, ``data.num_train``...), the method's own knobs (its
  identity already holds only those), the schedule's own keys (``min_lr`` for cosine,
  ``milestones``/``gamma`` for step), alpha only with PGT, the optimizer's knobs. The full
  resolved config goes with the run as ``config.yaml``.
* **grouping** (:func:`config_key`): the identity without the seed, hashed; the tag and
  param ``config_key`` put the seeds of one configuration together under MLflow's "group
  by", and ``config_label`` names it (e.g. ``digits_cnn pgt α=0.25 b64``).
* **outcome** (:func:`outcome_tags`): the run's ``status`` and, for a run that did not
  finish, a one-line ``reason``.

MLflow params cannot change once logged: runs mirrored by an older version keep the params
they had (the full identity, flattened); these apply to runs opened from now on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from analysis.configs import config_key, config_label, point_label
from trainers.catalog import data_facts, data_knobs

# the MLflow run status each of our statuses ends with; ``reason`` says why
STATUS_FOR_MLFLOW = {
    "done": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "pruned": "KILLED",  # stopped by the search's pruner
    "interrupted": "KILLED",  # Ctrl-C, a cancelled sweep, a killed job, a requeue
}
SCHEDULE_KEYS = {
    "cosine": ("name", "warmup_epochs", "warmup_start_factor", "min_lr"),
    "step": ("name", "warmup_epochs", "warmup_start_factor", "milestones", "gamma"),
}


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_params(identity: dict[str, Any], run_id: int) -> dict[str, Any]:
    """The run's MLflow params (see the module docstring)."""
    ident = dict(identity)
    out: dict[str, Any] = {}
    model = ident.pop("model", None)
    out.update(_flat(model, "model.") if isinstance(model, dict) else {"model": model})
    out.update(_flat(ident.pop("method", {}) or {}, "method."))
    data = dict(ident.pop("data", {}) or {})
    if data.get("_target_"):  # your own data set: its dotted name and arguments
        out.update(_flat(data, "data."))
    else:
        name = data.get("name")
        out["data.name"] = name
        for k in data_knobs(str(name)):
            if k in data:
                out[f"data.{k}"] = data[k]
        for k, v in data_facts(data).items():
            out.setdefault(f"data.{k}", v)
    sched = dict(ident.pop("schedule", {}) or {})
    for k in SCHEDULE_KEYS.get(str(sched.get("name")), tuple(sched)):
        if k in sched:
            out[f"schedule.{k}"] = sched[k]
    if ident.get("alpha") is None:
        ident.pop("alpha", None)  # no PGT: alpha has no effect
    opt = ident.pop("optimizer", None)
    out["optimizer.name"] = "sgd" if opt is None else opt.get("name")
    if opt is not None:
        out.update({f"optimizer.{k}": v for k, v in opt.items() if k != "name"})
    out.update(_flat(ident, ""))
    out["config_key"] = config_key(identity)
    out["results_run_id"] = run_id
    return out


def run_tags(identity: dict[str, Any], config_hash: str, method: str, model: str) -> dict[str, str]:
    """The tags every run's MLflow run carries (a sweep adds ``sweep_id`` and its parent)."""
    data = identity.get("data") or {}
    return {
        "config_hash": config_hash,
        "config_key": config_key(identity),
        "config_label": config_label(identity),
        "method": method,
        "model": model,
        "data": str(data.get("_target_") or data.get("name", "?")).rsplit(".", 1)[-1],
        "seed": str(identity.get("seed")),
    }


# the tags that say which sweep a run is part of: a later sweep that trains the run again
# (resumed, retried, taken over) replaces them all, so the run sits under that sweep's parent
SWEEP_TAGS = ("mlflow.parentRunId", "sweep_id", "sweep_name", "point", "config_label",
              "fused_group", "jobs_per_gpu", "optuna_study", "optuna_trial")  # fmt: skip


def point_tags(point: str, identity: dict[str, Any]) -> dict[str, str]:
    """A sweep point's own tags: ``point`` (its overrides as typed) and ``config_label``
    (its configuration's name in the sweep, :func:`analysis.configs.point_label`: without
    the seed and the keys that do not change the run, as the parent's summary names it)."""
    tags = {"point": point[:500]}
    if label := point_label(point, identity):
        tags["config_label"] = label[:500]
    return tags


def sweep_tags(sweep_id: int, sweep_name: str, parent_run_id: str | None, point: str,
               identity: dict[str, Any], trial: int | None = None) -> dict[str, str]:  # fmt: skip
    """The tags of a run in a sweep, from the store (its link to the sweep): for a run whose
    job never opened its MLflow run, and for ``python -m sweeper mirror``."""
    tags = {"sweep_id": str(sweep_id), "sweep_name": sweep_name, **point_tags(point, identity)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if trial is not None:
        tags["optuna_trial"] = str(trial)
    return tags


# submitit's wrapper around a job's exception (str(job.exception())): the exception itself
# is the last line of the traceback inside it
SUBMITIT_WRAPPER = re.compile(r"^Job \(task=\d+\) failed during processing")
TRACEBACK = "Traceback (most recent call last):"


def exception_line(text: str) -> str:
    """The exception a traceback ends with (its first line): the first unindented line after
    the last ``Traceback (most recent call last):`` ('' without one)."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.strip() == TRACEBACK]
    if not starts:
        return ""
    for ln in lines[starts[-1] + 1 :]:
        if ln.strip() and not ln[:1].isspace() and not ln.startswith("-" * 8):
            return ln.strip()
    return ""


def reason(status: str, error: str | None = None, diverged_step: int | None = None,
           epoch: int | None = None, epochs: int | None = None) -> str:  # fmt: skip
    """Why a run did not finish, in one line ('' for a finished one)."""
    if status == "done":
        return ""
    if status == "diverged":
        at = f" at step {diverged_step}" if diverged_step is not None else ""
        return f"diverged: non-finite loss{at}"
    if status == "pruned":
        at = f" after epoch {epoch}/{epochs}" if epoch is not None else ""
        return f"pruned by the search's pruner{at}; asked for again, it resumes"
    text = (error or "").strip()
    first = (text.splitlines() or [""])[0].strip()
    if status == "interrupted":
        return (first or "interrupted; the same command resumes it")[:500]
    # failed: a traceback (as the job recorded it, or inside submitit's wrapper when the job
    # raised before it could record anything) gives its exception; a message of ours is its
    # first line (a traceback in the stderr tail that follows it is not the reason)
    if first.startswith("Traceback") or SUBMITIT_WRAPPER.match(first):
        line = exception_line(text) or first
    else:
        line = first
    return line[:500] or "failed"


def outcome_tags(status: str, **why: Any) -> dict[str, str]:
    """``status`` and (unless done) ``reason`` tags of an ended run."""
    tags = {"status": status}
    r = reason(status, **why)
    if r:
        tags["reason"] = r
    return tags


def config_yaml(run_dir: Path, config: dict[str, Any]) -> Path:
    """Write the run's full resolved config (as the store records it) to
    ``<run_dir>/config.yaml`` and return the path (logged as an MLflow artifact)."""
    import yaml  # PyYAML, which Hydra and OmegaConf need anyway

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
    tmp.replace(path)
    return path

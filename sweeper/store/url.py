"""Store URLs: the default location, the driver we install, and how to print one."""

from __future__ import annotations

from pathlib import Path


def default_url(results_dir: str | Path) -> str:
    """The results store when ``store.url`` is not given: a SQLite file in the results dir."""
    return f"sqlite:///{Path(results_dir).expanduser().resolve() / 'results.db'}"


def default_tracking_uri(results_dir: str | Path) -> str:
    """MLflow's tracking store when ``mlflow.tracking_uri`` is not given."""
    return f"sqlite:///{Path(results_dir).expanduser().resolve() / 'mlflow.db'}"


def engine_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` without a driver -> psycopg 3 (a dependency).

    SQLAlchemy's default driver for ``postgresql://`` is psycopg2, which gradsweep does not
    install; every component (results store, Optuna storage, MLflow, analysis) opens its
    URL through this, so users can paste the plain URL their database admin gives them."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs and in-memory ones)."""
    if not url.startswith("sqlite:///"):
        return None
    db = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(db) if db and db != ":memory:" and not db.startswith("file:") else None


def display_url(url: str) -> str:
    """The URL as it may be printed: without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only a label; an unparsable URL is shown as given
        return url

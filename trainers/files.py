"""Writing a run's files: an error says which file.

Light on purpose (no torch): the sweeper's job module uses it before torch is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside carries ``path``: a write that fails on a full disk raises
    ``[Errno 28] No space left on device`` with no file name, and the one line a user reads
    should say which file (which disk) it was."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise

"""The one error boundary: how any failure becomes one line and an exit status.

Library code and the Hydra plugins *raise* (never print or exit): :class:`ConfigError` for
bad input (exit 2), :class:`Failed` when work ran and did not succeed (exit 1),
``KeyboardInterrupt`` for Ctrl-C or SIGTERM (exit 130). :func:`boundary`, called by each
entry point (``python -m sweeper`` and its subcommands, ``python -m analysis``), turns them
into ``error: <one line>`` on stderr and the exit status. Anything else is a bug or a crash
of the job: its traceback is printed and the status is 1.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable

from trainers.registry import ConfigError, first_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # like a shell: 128 + SIGINT

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ConfigError",
    "Failed",
    "boundary",
    "first_line",
]


class Failed(Exception):
    """Work ran and did not succeed (a failed run, failed sweep points, a study without a
    complete trial). The message is one line; the details are in the store."""


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(e: OSError) -> str:
    """``no space left on device: PATH`` (or the quota's words): what and where."""
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
    return f"{what}: {e.filename}" if e.filename else what


def _is_config_exception(e: BaseException) -> bool:
    """Hydra's and OmegaConf's own errors about the command line or the config files."""
    mod = type(e).__module__ or ""
    return mod.startswith(("hydra.errors", "omegaconf.errors", "hydra.core.override_parser"))


def boundary(main: Callable[[], int | None],
             config_error_line: Callable[[BaseException], str] = first_line) -> int:  # fmt: skip
    """Run an entry point; return its exit status after printing any error in one line.
    ``config_error_line``: the one line of a Hydra / OmegaConf error (the CLI's parser of
    their multi-line messages). Output piped into a reader that stopped (``| head``) ends
    quietly."""
    try:
        return main() or EXIT_OK
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except ConfigError as e:
        _say(first_line(e))
        return EXIT_BAD_INPUT
    except Failed as e:
        _say(first_line(e))
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the runner has said what it did
        _say(f"interrupted ({str(e) or 'Ctrl-C'}); run the same command again to resume")
        return EXIT_INTERRUPTED
    except OSError as e:
        if not disk_full(e):
            traceback.print_exc()
            return EXIT_FAILED
        _say(disk_full_line(e))
        return EXIT_FAILED
    except Exception as e:
        if _is_config_exception(e):
            _say(config_error_line(e))
            return EXIT_BAD_INPUT
        traceback.print_exc()
        return EXIT_FAILED


def _quiet_stdout() -> None:
    """The reader of our stdout went away: point stdout at /dev/null, so that flushing it at
    exit does not raise again (Python's documented way to handle SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout file descriptor (e.g. captured)
        pass


def _say(line: str) -> None:
    print(f"error: {_short_numbers(line)}", file=sys.stderr, flush=True)


def _short_numbers(line: str) -> str:
    """A number of thousands of digits (a typo, or a value beyond the limits) is shown by
    its ends and its length, so that the one line stays readable."""
    return re.sub(r"\d{41,}", lambda m: f"{m[0][:4]}...{m[0][-4:]} ({len(m[0])} digits)", line)

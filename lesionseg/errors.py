"""Errors a user can act on. The command line prints them as one line and exits with status 2.
Also how a stop signal during start-up becomes the `Stopped` error (status 75)."""

import errno
import os
import signal
import threading
from typing import Any


class UserError(Exception):
    """Bad input, configuration or environment; the message names the file or key and the problem.

    `shared`: every rank raises the same error (a config error, or one the ranks exchanged),
    so only rank 0 prints it."""

    shared = False


class DataError(UserError, ValueError):
    """A problem with the input data (a data set, a shard, a sample); the message names it."""


# OSErrors of the machine rather than of an input: no space, quota, read-only, I/O, permission.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                                errno.EPERM})


def is_environmental(e: BaseException, reading: bool = False) -> bool:
    """Whether an exception is the machine's fault (disk full, read-only, I/O error,
    permissions): the run stops (one line, status 2) and a rerun retries, never a per-input
    error row. `reading` an input, only an I/O error is: an unreadable file is the input's."""
    if not isinstance(e, OSError):
        return False
    return e.errno == errno.EIO if reading else e.errno in ENVIRONMENT_ERRNOS


def environment_message(e: OSError, doing: str) -> str:
    """One line: what failed, the system's reason and its file, and what to do."""
    where = f" ({e.filename})" if e.filename else ""
    return (f"{doing} failed: {e.strerror or e}{where}; free space or fix the folder's "
            "permissions, then rerun the same command to continue")


class RankError(Exception):
    """A wait that failed: a data worker or another rank died or stopped answering. One line
    naming the rank and what it waited for; exit status 1. `shared` as for UserError."""

    def __init__(self, message: str, shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared


class Stopped(Exception):
    """A stop signal (SIGINT, SIGTERM, SIGUSR1) before there was a state to save: exit 75."""


class _StartupStop:
    """The start-up handler: `Stopped` in the process that installed it; in a child forked
    meanwhile (a pack pool worker, terminated with SIGTERM) the signal's default action."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(f"{signal.Signals(signum).name} during start-up, before there was a "
                      "state to save; rerun the same command to start (or resume)")


def stop_during_startup() -> dict[int, Any]:
    """Until the loop installs its StopFlag, a stop signal ends the command as a stop.
    Returns the handlers it replaced (`restore_handlers` puts them back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handler = _StartupStop()
    return {sig: signal.signal(sig, handler)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its first argument, as webdataset wraps a
    long context into the others), without webdataset's ' @ <file>' tail; the type's name
    when there is no message. For one-line errors that quote a library's reason."""
    text = str(e.args[0]) if e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0].split(" @ <")[0]


# Exit statuses shared by the jobs, Slurm scripts and docs.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad config, bad input, missing files: fix and rerun
EXIT_RESUME = 75  # stopped on SIGINT/SIGTERM/SIGUSR1 (after saving a state if any): rerun (requeue) to resume

"""Errors a user can act on. The command line prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input, configuration or environment; the message names the file or key and the problem."""


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
EXIT_RESUME = 75  # stopped on SIGTERM/SIGUSR1 after saving a state: rerun (requeue) to resume

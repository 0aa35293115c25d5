"""Errors a user can act on. The command line prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input, configuration or environment; the message names the file or key and the problem."""


# Exit statuses shared by the jobs, Slurm scripts and docs.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad config, bad input, missing files: fix and rerun
EXIT_RESUME = 75  # stopped on SIGTERM/SIGUSR1 after saving a state: rerun (requeue) to resume

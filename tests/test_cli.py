"""lesionseg.cli: how a command's failures reach the user."""

from __future__ import annotations

import errno
import os

import pytest

from lesionseg import cli


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT])
def test_a_failure_of_the_machine_is_one_line_and_status_2(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture,
                                                           code: int) -> None:
    """Any job (training saving a state, a merge writing summary.json, …) that hits a full
    disk or a read-only folder ends with one line naming the file and status 2."""
    def command(_args):
        raise OSError(code, os.strerror(code), "/runs/x/states/.tmp-step-0000004/optimizer.bin")

    monkeypatch.setattr(cli, "build_parser",
                        lambda name, prog=None: (cli.argparse.ArgumentParser(prog="lesionseg x"),
                                                 command))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(code) in err[0] and "optimizer.bin" in err[0]
    assert "rerun" in err[0]


def test_other_os_errors_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def command(_args):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))  # a bug: keep the traceback

    monkeypatch.setattr(cli, "build_parser",
                        lambda name, prog=None: (cli.argparse.ArgumentParser(prog="lesionseg x"),
                                                 command))
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli.main(["train"])

"""The one exception type for mistakes a user can fix, and how it ends a run.

Anything the user can fix (a missing file, a bad config key, a malformed
line) raises `UserError` with a message that names the file, line or key.
The command line turns it into one line on stderr and exit code 2; every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """Bad input: a one-line message naming what is wrong and where."""


class NonFiniteLoss(RuntimeError):
    """Training stopped, on every rank together, because a loss or gradient went NaN/inf."""


def launcher_rank() -> int:
    """This process's rank as set by horovodrun (or mpirun), 0 when launched alone.

    Read from the environment so it works before Horovod (and TensorFlow) are
    imported: that is when most bad input is found.
    """
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def exit_with_user_error(error: UserError, prog: str = "main.py") -> None:
    """Print `error` once (from rank 0 only) and exit with code 2."""
    if launcher_rank() == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` means a collective failed because another rank is gone.

    Horovod reports it two ways, depending on which thread notices first:
    its own "Horovod has been shut down" (HorovodInternalError), or the
    TensorFlow op error of the collective carrying Gloo's text ("Read error
    ... Connection reset by peer", "Connection closed by peer"). Both count.
    Decided from the class names, so this module need not import TensorFlow.
    """
    text = str(error)
    if "Horovod has been shut down" in text or type(error).__name__ == "HorovodInternalError":
        return True
    is_op_error = any(cls.__name__ == "OpError" for cls in type(error).__mro__)
    return is_op_error and ("horovod" in text.lower() or "gloo" in text.lower())


def exit_on_known_failure(error: BaseException, prog: str = "main.py") -> None:
    """End a run that failed for a known reason with one line, not a traceback.

    Known: training stopped on a NaN/inf loss (every rank stops at the same
    step, rank 0 says so; exit 1); a full disk or a file-size limit (exit 2);
    Horovod shut down because another rank failed or was killed (each
    surviving rank says so, the failing rank's own error is printed above;
    exit 1). Anything else returns, for the caller to re-raise.
    """
    text = str(error)
    if isinstance(error, NonFiniteLoss):
        if launcher_rank() == 0:
            print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILURE)
    if isinstance(error, OSError) and (
        error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)
        or "No space left" in text
        or "File too large" in text
    ):
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        if launcher_rank() == 0:
            print(
                f"{prog}: error: cannot write{where}: {error.strerror or text}; free space, raise the file-size "
                "limit or choose another directory (files being written were removed; earlier ones are intact)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(EXIT_USER_ERROR)
    if is_lost_peer(error):
        print(
            f"{prog}: error (rank {launcher_rank()}): another rank stopped (it failed, was killed or lost its "
            "connection), so Horovod shut down here too; the first error above is the cause. "
            "Continue from the last checkpoint with --run-dir DIR --resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_FAILURE)


def run_main(body: Callable[[], None], prog: str = "main.py") -> None:
    """Run a command-line entry point: a UserError or a known failure ends it with one line
    (exit 2 or 1); anything else keeps its traceback."""
    try:
        body()
    except UserError as e:
        exit_with_user_error(e, prog)
    except Exception as e:
        exit_on_known_failure(e, prog)
        raise

"""The one exception type for mistakes a user can fix, and how it ends a run.

Anything the user can fix (a missing file, a bad config key, a malformed
line) raises `UserError` with a message that names the file, line or key.
The command line turns it into one line on stderr and exit code 2; every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: a one-line message naming what is wrong and where."""


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

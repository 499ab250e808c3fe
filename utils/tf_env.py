"""Import TensorFlow (and Horovod) without their start-up chatter.

TensorFlow 2.21 logs several lines (oneDNN notices, "could not find cuda
drivers", CPU-feature hints) before its logging is configured, so
TF_CPP_MIN_LOG_LEVEL cannot silence them; Horovod's library adds an absl
notice. They are filtered here; any other line written meanwhile is passed
through. Set TF_CPP_MIN_LOG_LEVEL yourself to see TensorFlow's logs again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog.*|[IW]\d{4} .*|"
    rb"To enable the following instructions: .*|E\d{4} .*cuda.*)$"
)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Capture file descriptor 2 for the block; replay what is not known noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().splitlines():
                if line.strip() and not _NOISE.match(line):
                    sys.stderr.buffer.write(line + b"\n")
            sys.stderr.flush()


def import_tensorflow():
    """`import tensorflow` (and keras) quietly; returns the tensorflow module."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with quiet_native_logs():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]

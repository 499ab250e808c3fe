"""`import utils.distributed as hvd` alone gives Horovod's Keras names; outside horovodrun, one rank."""

import os
import subprocess

from tests.conftest import CHILD_ENV, PYTHON, ROOT

NAMES = """
import utils.distributed as hvd
cb = hvd.callbacks
used = (cb.BroadcastGlobalVariablesCallback, cb.MetricAverageCallback,
        cb.LearningRateWarmupCallback, hvd.DistributedOptimizer, hvd.load_model,
        hvd.broadcast_variables, hvd.allreduce, hvd.Compression.fp16)
hvd.init()
print(hvd.size(), hvd.rank(), hvd.local_rank(), hvd.local_size(), hvd.allreduce(3.0))
"""


def test_one_import_gives_horovods_names_and_one_rank_outside_horovodrun():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI_"))}
    result = subprocess.run(
        [PYTHON, "-c", NAMES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **CHILD_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "0", "0", "1", "3.0"]


def test_a_lost_peer_is_recognised_whichever_thread_reports_it():
    """Gloo's op error and Horovod's shutdown both end a survivor with one line, exit 1."""
    import pytest
    import tensorflow as tf

    from utils.errors import EXIT_FAILURE, exit_on_known_failure, is_lost_peer

    gloo = tf.errors.UnknownError(
        None,
        None,
        "gloo/transport/tcp/pair.cc:589] Read error [127.0.0.1]:5533: Connection reset by peer\n"
        "\t [[{{node HorovodGroupedAllreduce_0}}]]",
    )
    shutdown = RuntimeError(
        "Horovod has been shut down. This was caused by an exception on one of the ranks"
    )
    unrelated = tf.errors.UnknownError(None, None, "Failed to read file data/corpus.txt")
    assert is_lost_peer(gloo) and is_lost_peer(shutdown)
    assert not is_lost_peer(unrelated) and not is_lost_peer(ValueError("gloo"))
    with pytest.raises(SystemExit) as ended:
        exit_on_known_failure(gloo)
    assert ended.value.code == EXIT_FAILURE
    assert exit_on_known_failure(unrelated) is None

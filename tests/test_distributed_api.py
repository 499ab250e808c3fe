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

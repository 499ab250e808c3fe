"""Shared utilities: configuration, command line, Horovod, checkpoints, metrics, plots.

Importing this package sets one TensorFlow default that must be in place
before TensorFlow itself is imported (every entry point imports `utils`
first): oneDNN for TensorFlow's CPU kernels. TensorFlow turns oneDNN on by
itself only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX; on an AVX2 CPU it
stays off, and the same XLA-compiled step then runs 1.4x slower (the
reference step on a 2-core AMD EPYC: 58.9 ms off, 42.5 ms on; the kernels
XLA emits are identical, bench/results/avx2/report.md has the profile).
`TF_ENABLE_ONEDNN_OPTS=0` in the environment still turns it off.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

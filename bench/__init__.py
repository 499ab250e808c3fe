"""Benchmarks: training throughput, Horovod overhead and scaling, MFU, input pipeline, options.

python -m bench --help
"""

import utils  # noqa: F401  (TensorFlow's CPU defaults, before TensorFlow is imported)

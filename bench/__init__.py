"""Benchmarks: training throughput, Horovod overhead and scaling, MFU, input pipeline, options.

python -m bench --help
"""

"""edgegate benchmarks: each figure measured against its peer in the same run (``python -m benchmarks``)."""

"""Benchmark harness for gc-fabric and its peers; run it with ``python -m bench.run``."""

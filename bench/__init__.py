"""The serving benchmark: `python -m bench.bench_serving` (make bench)."""

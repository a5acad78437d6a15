"""irepa benchmarks: each module is a script (``python -m bench.<name> --help``) printing a table
that ends in ratios; ``python -m bench.run_all`` runs the CPU suite, ``bench/gpu.sh`` the GPU one.
See docs/BENCHMARKS.md."""

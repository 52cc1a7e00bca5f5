"""Benchmarks of the tool on this machine (`make bench`, `python -m bench --help`); see BENCHMARKS.md."""

"""Benchmark timing, machine description and reports for `dpa bench` (torch-free)."""

"""Benchmarks (`make bench`): scripts, not collected by pytest."""

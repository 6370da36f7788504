"""Fuzz targets for meshd's sans-I/O cores and parsers (see `targets.py`) and their long-budget runner."""

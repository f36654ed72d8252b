"""Measurement and reports: ``sdrt bench`` (see benchmarks/README.md)."""

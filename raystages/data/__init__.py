"""Data: sources (files, hub names, the built-in task), tokenisation, packing, per-stage rows."""

"""Data sets: one module per source format, plus the in-memory device pipeline."""

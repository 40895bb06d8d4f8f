"""Performance benchmarks (figures go to BENCHMARKS.md)."""

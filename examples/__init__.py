"""Example handlers used by ``ndpipe demo``, the tests and the benchmarks."""

"""The researcher's bench: datasets, partitions, `fedhead simulate`, benchmarks."""

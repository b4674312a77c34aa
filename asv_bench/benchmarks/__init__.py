"""lossforge's asv benchmarks: a module per loss family, a class per loss (see
docs/benchmarks.md). ``common`` holds the parameters and the shared base class."""

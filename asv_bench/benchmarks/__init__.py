"""lossforge's asv benchmarks: ``bench_losses.Losses``, one class parametrized over every
registered loss and the input kinds it declares, and ``bench_startup`` (see
docs/benchmarks.md). ``common`` holds the parameters and helpers."""

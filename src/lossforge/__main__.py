"""``python -m lossforge`` (also the ``lossforge`` console script).

Subcommands: ``list`` (losses with family, plugin and backends), ``plugins`` (plugins, their
losses and kernels, and failures), ``demo`` (a loss and its gradient beside PyTorch's),
``bench`` (side-by-side timings), ``warmup`` (compile kernels ahead of time).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence


def _list(args: argparse.Namespace) -> int:
    from lossforge.registry import registry

    rows = [("loss", "family", "plugin", "backends (supplier)")]
    for name in registry.names():
        loss = registry.get(name)
        suppliers = loss.suppliers
        backends = ", ".join(
            b if suppliers[b] == loss.plugin else f"{b} ({suppliers[b]})" for b in loss.backends
        )
        rows.append((name, loss.family, loss.plugin, backends or "-"))
    _table(rows)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from lossforge.registry import registry

    # strict mode must not stop the listing at the first failure: list them all, then fail
    strict, registry.strict = registry.is_strict(), False
    registry.ensure_loaded()
    for info in sorted(registry.plugins.values(), key=lambda i: i.name):
        status = "FAILED" if info.failed else "skipped" if info.skipped else "ok"
        builtin = " (built-in)" if info.builtin else ""
        print(f"{info.name}  [{status}]  {info.source}{builtin}")
        if info.skipped:
            print(f"    skipped: {info.skipped}")
        for name in info.losses:
            backends = sorted(b for (n, b) in info.kernels if n == name)
            print(f"    {name}: {', '.join(backends) or 'no kernels'}")
        for loss, backend in sorted(info.kernels):
            if loss not in info.losses:
                print(f"    {loss}: {backend} (overrides {registry.owners.get(loss, '?')!r})")
        for error in info.errors:
            print(f"    error: {error}")
    return 1 if strict and any(info.failed for info in registry.plugins.values()) else 0


def _demo(args: argparse.Namespace) -> int:
    from lossforge.demo import main

    return main(args)


def _bench(args: argparse.Namespace) -> int:
    from lossforge.bench import main

    return main(args.bench_args)


def _warmup(args: argparse.Namespace) -> int:
    from lossforge.warmup import warmup

    names = args.names or None
    done = warmup(names=names, dtypes=tuple(args.dtypes), progress=print)
    print(f"compiled {len(done)} kernels")
    return 0


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lossforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="losses with family, plugin and backends").set_defaults(run=_list)
    sub.add_parser("plugins", help="plugins, their losses, and failures").set_defaults(run=_plugins)
    demo = sub.add_parser("demo", help="a loss and its gradient, beside PyTorch's")
    demo.add_argument("--size", type=int, default=1_000_000, help="elements (default 10^6)")
    demo.set_defaults(run=_demo)
    bench = sub.add_parser("bench", help="side-by-side timings (see --help)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    warm = sub.add_parser("warmup", help="compile kernels ahead of time")
    warm.add_argument("names", nargs="*", help="losses (default: all)")
    warm.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    warm.set_defaults(run=_warmup)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # bench parses its own options (REMAINDER drops leading ones)
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    args = parser.parse_args(argv)
    from lossforge.registry import PluginError

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            return args.run(args)
        except PluginError as exc:  # strict mode, or a broken kernel: a message, no traceback
            print(f"lossforge: error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``mpstore`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["bench_config", "build_parser", "main"]

_STRATEGIES = ("mpstore", "ungated", "filelock", "ceiling", "ceiling-batched")
_MODES = ("processes", "threads")
_SCENARIOS = ("upsert", "modify", "mixed")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark concurrent conversation writes against the alternatives",
        description=(
            "Concurrent workers x writes per worker of 2 KiB conversation upserts, mpstore side by "
            "side with an ungated plain-sqlite pool, filelock, and the single-writer ceiling. "
            "Default cells: 4x10, 8x10, 16x10, 16x100. Medians over --repeat runs."
        ),
    )
    bench.add_argument(
        "--workers",
        type=_positive,
        nargs="+",
        metavar="N",
        help="concurrent workers (a list runs one cell per value)",
    )
    bench.add_argument(
        "--writes",
        type=_positive,
        nargs="+",
        metavar="M",
        help="writes per worker (a list runs one cell per value)",
    )
    bench.add_argument(
        "--mode",
        nargs="+",
        choices=_MODES,
        default=None,
        help="processes (spawned) and/or threads (default: both)",
    )
    bench.add_argument(
        "--strategy",
        nargs="+",
        choices=_STRATEGIES,
        default=None,
        help="strategies to run (default: all; ratios need 'ceiling')",
    )
    bench.add_argument(
        "--scenario",
        nargs="+",
        choices=_SCENARIOS,
        default=["upsert"],
        help="upsert (default), modify (read-then-write), mixed (with readers)",
    )
    bench.add_argument(
        "--repeat",
        type=_positive,
        default=None,
        help="repetitions per cell; medians are reported (default 3, --quick 1)",
    )
    bench.add_argument(
        "--context-bytes",
        type=_positive,
        default=2048,
        help="size of each conversation's context JSON (default 2048)",
    )
    bench.add_argument(
        "--readers",
        type=_positive,
        default=2,
        help="reader workers in the mixed scenario (default 2)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: cells 4x10 and 16x20, one repetition",
    )
    bench.add_argument(
        "--json",
        metavar="FILE",
        help="write every repetition, the medians and machine info as JSON",
    )
    bench.add_argument("--plot", metavar="FILE.png", help="plot throughput and p99 against workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpstore", description="A SQLite store that many processes can write to at once."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(commands)
    return parser


def bench_config(args: argparse.Namespace) -> Any:
    """The :class:`mpstore._bench.BenchConfig` that parsed ``bench`` arguments ask for."""
    from . import _bench

    if args.workers is None and args.writes is None:
        cells = list(_bench.QUICK_CELLS if args.quick else _bench.DEFAULT_CELLS)
    else:
        workers = args.workers or sorted({w for w, _ in _bench.DEFAULT_CELLS})
        writes = args.writes or [10]
        cells = [(w, m) for m in writes for w in workers]
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    return _bench.BenchConfig(
        cells=cells,
        modes=list(dict.fromkeys(args.mode or _MODES)),
        strategies=list(dict.fromkeys(args.strategy or _STRATEGIES)),
        scenarios=list(dict.fromkeys(args.scenario)),
        repeat=repeat,
        context_bytes=args.context_bytes,
        readers=args.readers,
    )


def _bench_main(args: argparse.Namespace) -> int:
    from . import _bench

    if args.plot:
        try:
            _bench.check_plotting()
        except _bench.PlotUnavailable as exc:
            print(f"mpstore bench: {exc}", file=sys.stderr)
            return 2
    config = bench_config(args)
    print(_bench.format_table([]), flush=True)

    def on_cell(rows: list[_bench.Summary]) -> None:
        for row in rows:
            print(_bench.format_row(row), flush=True)

    def progress(message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    document = _bench.run_bench(config, on_cell=on_cell, progress=progress)
    print(f"wall time {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
    if args.plot:
        _bench.plot(document, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        return _bench_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

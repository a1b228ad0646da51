"""The ``mpstore`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["bench_config", "build_parser", "main"]

_STRATEGIES = ("mpstore", "ungated", "filelock", "ceiling", "ceiling-batched", "handoff")
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
            "side with an ungated plain-sqlite pool, filelock, the single-writer ceiling and the "
            "bare hand-off of group commit between threads or processes (handoff). Default "
            "cells: 4x10, 8x10, 16x10, 16x100. Medians over --repeat runs."
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
        help="strategies to run (default: all; ratios need 'ceiling'; 'handoff' with processes "
        "runs on Linux only, and never the modify scenario)",
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


def _add_immutable(command: Any) -> None:
    command.add_argument(
        "--immutable",
        action="store_true",
        help="where SQLite cannot create the -shm index beside the file (a read-only medium), "
        "read it without that index and without locks: only for a file nothing writes "
        "meanwhile; refused if its -wal file holds changes",
    )


def _add_inspection(commands: Any) -> None:
    info = commands.add_parser(
        "info",
        help="collections, row counts, file sizes, modes, the write gate and the mailbox",
        description=(
            "Report on a store without changing it: collections and their row counts, other "
            "tables, file and WAL sizes, schema version, journal mode, and whether a process "
            "holds the write gate now (its pid, and for how long), and the writes waiting in "
            "its mailbox. Opens the file read-only; a missing file is an error."
        ),
    )
    info.add_argument("path", metavar="PATH", help="the database file")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_immutable(info)

    check = commands.add_parser(
        "check",
        help="check the file's integrity; exit status 0 only when healthy",
        description=(
            "Run SQLite's integrity check, then check every collection: its table and indexes "
            "exist, each value is a JSON object carrying its key, and each indexed column "
            "matches the JSON. Prints 'ok' and exits 0 when healthy; lists the problems and "
            "exits 1 otherwise."
        ),
    )
    check.add_argument("path", metavar="PATH", help="the database file")
    _add_immutable(check)

    export = commands.add_parser(
        "export",
        help="write a collection's records as JSON Lines",
        description=(
            "Write every record of COLLECTION, one JSON object per line in key order, from one "
            "consistent snapshot, to standard output or to FILE."
        ),
    )
    export.add_argument("path", metavar="PATH", help="the database file")
    export.add_argument("collection", metavar="COLLECTION", help="the collection to export")
    export.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE (complete or not at all) instead of standard output",
    )
    _add_immutable(export)

    imp = commands.add_parser(
        "import",
        help="upsert JSON Lines into a collection, all or nothing",
        description=(
            "Validate every line of FILE ('-' for standard input), then upsert all the records "
            "into COLLECTION in one transaction through the write gate: one bad line imports "
            "nothing. With --model the records are validated by that pydantic model and the "
            "database and collection are created if missing; without it the collection must "
            "exist and each line must be a JSON object with a non-empty string key and every "
            "indexed field."
        ),
    )
    imp.add_argument("path", metavar="PATH", help="the database file")
    imp.add_argument("collection", metavar="COLLECTION", help="the collection to import into")
    imp.add_argument("file", metavar="FILE", help="JSON Lines to import ('-': standard input)")
    imp.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="validate with this pydantic model, e.g. myapp.models:Note (imported by name)",
    )
    imp.add_argument(
        "--key",
        metavar="FIELD",
        help="the key field of a collection that does not exist yet (default: id)",
    )
    imp.add_argument(
        "--index",
        action="append",
        metavar="FIELDS",
        help=(
            "with --model: an index to declare, fields separated by commas, '-' for descending "
            "(e.g. workspace_id,-updated_at; --index=-field when the first is descending); "
            "repeat for more"
        ),
    )
    imp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress line on standard error (default: for files over 1 MiB)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpstore", description="A SQLite store that many processes can write to at once."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(commands)
    _add_inspection(commands)
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


def _unwritable(path: str) -> str | None:
    """Why an output file cannot be written at ``path``, or None; asked before a long run."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(directory):
        return f"cannot write {path}: its directory does not exist"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"cannot write {path}: permission denied"
    return None


def _bench_main(args: argparse.Namespace) -> int:
    from . import _bench

    for path in (args.json, args.plot):
        reason = _unwritable(path) if path else None
        if reason is not None:
            print(f"mpstore bench: {reason}", file=sys.stderr)
            return 2
    if args.plot:
        try:
            _bench.check_plotting()
        except _bench.PlotUnavailable as exc:
            print(f"mpstore bench: {exc}", file=sys.stderr)
            return 2
    config = bench_config(args)
    if not _bench.planned(config):
        print(
            "mpstore bench: nothing to run: 'handoff' with processes runs on Linux only, and "
            "never the modify scenario",
            file=sys.stderr,
        )
        return 2
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


def _info_main(args: argparse.Namespace) -> int:
    from . import _inspect

    report = _inspect.info(args.path, args.immutable)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(_inspect.format_info(report))
    return 0


def _check_main(args: argparse.Namespace) -> int:
    from . import _inspect

    problems = _inspect.check(args.path, args.immutable)
    if not problems:
        print("ok")
        return 0
    for problem in problems:
        print(problem)
    print(f"mpstore check: {args.path} is damaged ({len(problems)} problems)", file=sys.stderr)
    return 1


def _export_main(args: argparse.Namespace) -> int:
    from . import _inspect

    if args.output:
        count = _inspect.export_to_file(args.path, args.collection, args.output, args.immutable)
    else:
        _as_utf8(sys.stdout)
        count = _inspect.export(args.path, args.collection, sys.stdout, args.immutable)
        sys.stdout.flush()
    print(f"exported {count} records from {args.collection}", file=sys.stderr)
    return 0


def _as_utf8(stream: Any) -> None:
    """Read or write the standard stream ``stream`` as strict UTF-8, as JSON Lines files are,
    whatever the locale says (cp1252 on Windows, Latin-1, ASCII)."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(encoding="utf-8", errors="strict")


def _progress_line(done: int, total: int | None, records: int) -> None:
    from ._inspect import format_bytes

    share = f", {100 * done // total}% of {format_bytes(total)}" if total else ""
    print(f"\rmpstore import: {records} records read{share}", end="", file=sys.stderr, flush=True)


def _import_main(args: argparse.Namespace) -> int:
    from . import _inspect
    from ._errors import InvalidName

    usage = None
    if args.index and not args.model:
        usage = "--index needs --model, to compute the indexed fields from records"
    elif args.model:
        try:
            _inspect.split_model_spec(args.model)
        except InvalidName as exc:
            usage = str(exc)
    if usage is not None:
        print(f"mpstore import: {usage}", file=sys.stderr)
        return 2
    if args.file == "-":
        total = None
        source = sys.stdin
        _as_utf8(source)
    else:
        total = os.path.getsize(args.file)
        source = open(args.file, encoding="utf-8")  # noqa: SIM115 - closed below
    show = (
        args.progress if args.progress is not None else (total or 0) > _inspect.PROGRESS_THRESHOLD
    )
    try:
        count = _inspect.import_records(
            args.path,
            args.collection,
            source,
            label=args.file if args.file != "-" else "<stdin>",
            model=args.model,
            key=args.key,
            indexes=[tuple(spec.split(",")) for spec in args.index or ()],
            total_bytes=total,
            progress=_progress_line if show else None,
        )
    finally:
        if source is not sys.stdin:
            source.close()
        if show:
            print(file=sys.stderr)
    print(f"imported {count} records into {args.collection}", file=sys.stderr)
    return 0


_COMMANDS = {
    "bench": _bench_main,
    "info": _info_main,
    "check": _check_main,
    "export": _export_main,
    "import": _import_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mpstore`` command; errors are one line on standard error and exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ._errors import MpstoreError

    try:
        return _COMMANDS[args.command](args)
    except (MpstoreError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"mpstore {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

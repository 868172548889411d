"""The ``singleflight-agents`` command: demo, summary, verify, prune, export, import.

User mistakes print one line to stderr and exit 2; ``verify`` and ``import`` exit 1
when a receipt fails its check, ``export`` when a damaged one cannot be written. Output
cut short by its reader (``summary | head``) ends quietly with 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import suppress

from . import __version__
from ._cli_common import PROG, Progress, UsageError, existing_store, utf8
from ._cli_receipts import export_receipts, import_receipts, verify_store
from .demo import run_demo
from .engine import Singleflight
from .models import SingleflightError
from .reporting import format_json, format_markdown, format_summary
from .sessions import ignore_inherited_session
from .stats import damage, summarize
from .store import DEFAULT_PATH, ReceiptStore, SQLiteStore


def _parser() -> argparse.ArgumentParser:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                    help=f"store path, sqlite:/// or redis:// URL (default: {DEFAULT_PATH})")
    parser = argparse.ArgumentParser(prog=PROG, parents=[db], description=(
        "Exactly-once, signed, shareable tool calls for AI agents. The signing key comes from "
        "$SINGLEFLIGHT_SECRET or the key file beside the store."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("demo", parents=[db], help="three agents, six calls, three duplicates")
    commands.add_parser("openai-demo", parents=[db], help=(
        "an OpenAI Agents SDK agent, scripted and offline, with duplicate tool calls "
        "(extra [openai])"))
    commands.add_parser("langgraph-demo", parents=[db], help=(
        "a LangGraph agent, scripted and offline, with duplicate tool calls (extra [langgraph])"))
    commands.add_parser("mcp-demo", parents=[db], help=(
        "an MCP server over stdio, agents repeating its tool calls, then the run replayed with "
        "the server gone (extras [mcp,openai])"))
    summary = commands.add_parser("summary", parents=[db], help="savings per tool")
    which = summary.add_mutually_exclusive_group()
    which.add_argument("--run", metavar="ID", help="this run's statistics (default: the latest)")
    which.add_argument("--all", action="store_true", help="every run's statistics added up")
    form = summary.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON")
    form.add_argument("--markdown", action="store_true", help="print a Markdown table")
    commands.add_parser("verify", parents=[db], help="check every receipt's signature")
    commands.add_parser("prune", parents=[db], help="drop expired receipts, reclaim space")
    export = commands.add_parser("export", parents=[db], help="receipts as JSON Lines")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    load = commands.add_parser("import", parents=[db], help="add receipts from JSON Lines")
    load.add_argument("file", metavar="FILE", help="a file written by export, or - for stdin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    db = getattr(args, "db", None)
    ignore_inherited_session()  # --db is this command's store, whoever started it
    _tolerant_output()
    try:
        status = int(_COMMANDS[args.command](args, db))
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        return _reader_gone()
    except (UsageError, SingleflightError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _tolerant_output() -> None:
    # A --db path in bytes of another encoding reaches us as surrogate escapes: print it
    # back as those bytes, whatever error handler the locale gave this command's stdout.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def _reader_gone() -> int:
    # `summary --json | head`: stop without a word, as other Unix tools do. Not by restoring
    # SIGPIPE's default: that would kill us on a Redis socket too. Python flushes stdout
    # again at exit and would complain, so what is left goes to /dev/null.
    with suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + getattr(signal, "SIGPIPE", 13)  # 141, also where there is no SIGPIPE (Windows)


def _demo(args: argparse.Namespace, db: str | None) -> int:
    with Singleflight(db) as sf:
        asyncio.run(run_demo(sf))
    return 0


def _framework_demo(module: str, function: str, extra: str, db: str | None) -> int:
    try:
        run = getattr(importlib.import_module(module, __package__), function)
    except ImportError as exc:
        raise UsageError(f"this demo needs {exc.name}: pip install "
                         f"'singleflight-agents[{extra}]'") from None
    with Singleflight(db) as sf:
        asyncio.run(run(sf))
    return 0


def _openai_demo(args: argparse.Namespace, db: str | None) -> int:
    return _framework_demo(".demo_openai", "run_openai_demo", "openai", db)


def _langgraph_demo(args: argparse.Namespace, db: str | None) -> int:
    return _framework_demo(".demo_langgraph", "run_langgraph_demo", "langgraph", db)


def _mcp_demo(args: argparse.Namespace, db: str | None) -> int:
    return _framework_demo(".demo_mcp", "run_mcp_demo", "mcp,openai", db)


def _summary(args: argparse.Namespace, db: str | None) -> int:
    if args.run is not None and not (args.run and utf8(args.run)):
        raise UsageError(f"--run {args.run!r}: a run id is non-empty UTF-8 text; pass the id "
                         f"that summary, the report or $SINGLEFLIGHT_RUN_ID shows")
    with existing_store(db) as store:
        run = None if args.all else (args.run or store.latest_run())
        rows = _stats_rows(store, run)
        if args.run and not rows:
            latest = store.latest_run()
            known = f"its latest run is {latest!r}" if latest else "it has no runs yet"
            raise UsageError(f"no run {args.run!r} in {store.url} ({known}); pass a run id it "
                             f"holds, or --all")
        summary = summarize(rows, db_path=store.url, run_id=run)
    if args.json:
        print(format_json(summary))
    elif args.markdown:
        print(format_markdown(summary), end="")
    else:
        print(format_summary(summary))
    return 0


def _stats_rows(store: ReceiptStore, run: str | None) -> list[tuple[str, str, dict[str, float]]]:
    # Statistics are counters edited by nobody; a damaged row is reported, never added up.
    fix = "the receipts are not affected; summarize another run with --run ID"
    try:
        rows = store.load_stats(run)
    except (ValueError, RecursionError) as exc:  # a row that is not JSON
        which = f"of run {run!r}" if run else "of a run"
        raise UsageError(f"{store.url}: the statistics {which} are damaged (a row is not "
                         f"JSON: {exc}); {fix}") from None
    for row_run, tool, counters in rows:
        why = damage(counters)
        if why is not None:
            raise UsageError(f"{store.url}: the statistics of run {str(row_run)!r}, tool "
                             f"{str(tool)!r} are damaged ({why}); {fix}")
    return rows


def _prune(args: argparse.Namespace, db: str | None) -> int:
    with existing_store(db) as store, Progress("prune", counting=False):
        removed = store.prune(time.time())
    if isinstance(store, SQLiteStore):
        # Measured again now that the store is closed: closing the last connection may
        # checkpoint what a reader held back, so this is the size the command leaves.
        removed["bytes_after"] = store.bytes_on_disk()
    size = (f"; {removed['bytes_before']} -> {removed['bytes_after']} bytes"
            if "bytes_after" in removed else "")
    print(f"pruned {removed['receipts']} expired receipts, {removed['leases']} finished "
          f"leases, {removed['lock_files']} stale lock files{size}")
    return 0


_COMMANDS = {"demo": _demo, "openai-demo": _openai_demo, "langgraph-demo": _langgraph_demo,
             "mcp-demo": _mcp_demo,
             "summary": _summary, "verify": verify_store, "prune": _prune,
             "export": export_receipts, "import": import_receipts}

if __name__ == "__main__":
    raise SystemExit(main())

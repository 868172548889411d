"""The ``singleflight-agents`` command: demo, summary, verify, prune, export, import.

User mistakes print one line to stderr and exit 2; ``verify`` and ``import`` exit 1
when a receipt fails its check.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from . import __version__, codec
from .demo import run_demo
from .engine import Singleflight
from .models import Receipt, SingleflightError
from .reporting import format_json, format_markdown, format_summary
from .sessions import ignore_inherited_session
from .signing import ENV_SECRET, Signer, key_path_for, load_key
from .stats import summarize
from .store import DEFAULT_PATH, REDIS_SCHEMES, ReceiptStore, SQLiteStore, open_store, sqlite_path

PROG = "singleflight-agents"
_FIELDS = [f.name for f in dataclasses.fields(Receipt)]


class UsageError(Exception):
    """A mistake of the user's: printed as one line, exit status 2."""


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
    try:
        return int(_COMMANDS[args.command](args, db))
    except (UsageError, SingleflightError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _is_redis(db: str | None) -> bool:
    return db is not None and db.startswith(REDIS_SCHEMES)


@contextmanager
def _existing_store(db: str | None) -> Iterator[ReceiptStore]:
    if _is_redis(db):
        store: ReceiptStore = open_store(db)
    else:
        path = sqlite_path(db)
        if not path.is_file():
            raise UsageError(f"no store at {path}; pass --db with the path of an existing store")
        if path.stat().st_size == 0:
            raise UsageError(f"{path} is empty, not a singleflight store; pass --db with the "
                             f"path of an existing store")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"store {path} is not readable and writable by this user; fix its "
                             f"permissions")
        store = SQLiteStore(path)
    try:
        yield store
    finally:
        store.close()


def _signer(store: ReceiptStore) -> Signer:
    key_path = key_path_for(store.path) if isinstance(store, SQLiteStore) else None
    return Signer(load_key(None, key_path, create=False))


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


def _summary(args: argparse.Namespace, db: str | None) -> int:
    with _existing_store(db) as store:
        run = None if args.all else (args.run or store.latest_run())
        summary = summarize(store.load_stats(run), db_path=store.url, run_id=run)
    if args.json:
        print(format_json(summary))
    elif args.markdown:
        print(format_markdown(summary), end="")
    else:
        print(format_summary(summary))
    return 0


def _verify(args: argparse.Namespace, db: str | None) -> int:
    with _existing_store(db) as store:
        signer = _signer(store)
        store_problems = store.check() + _self_check(signer)
        bad: list[str] = []
        now = time.time()
        total = expired = foreign = 0
        for receipt in store.iter_receipts():
            total += 1
            name = f"{receipt.tool_name} {str(receipt.fingerprint)[:16]}"
            if receipt.key_id != signer.key_id:
                foreign += 1
                bad.append(f"{name}: signed with another key (key id {receipt.key_id})")
            elif not _verifies(signer, receipt):
                bad.append(f"{name}: signature mismatch (edited after it was signed)")
            else:
                expired += receipt.expires_at <= now  # a verified receipt's fields are sound
    if total and foreign == total:
        raise UsageError(f"every receipt in {store.url} was signed with another key than "
                         f"key id {signer.key_id}; set SINGLEFLIGHT_SECRET to the secret that "
                         f"signed them")
    for problem in store_problems + bad:
        print(f"FAIL {problem}")
    failed = bool(store_problems or bad)
    print(f"{'FAILED' if failed else 'ok'}: {total - len(bad)} of {total} receipts verified "
          f"({expired} expired), store self-check {'failed' if store_problems else 'passed'}")
    return 1 if failed else 0


def _verifies(signer: Signer, receipt: Receipt) -> bool:
    try:
        return signer.verify(receipt)
    except (TypeError, ValueError):  # a field of the wrong type: edited in the store
        return False


def _self_check(signer: Signer) -> list[str]:
    now = time.time()
    sample = signer.sign(Receipt("0" * 64, "self.check", "default", "default", "1", "{}", "",
                                 codec.JSON, codec.encode({"ok": (1, 2)})[1], now, now, 0.0,
                                 0.0, "self-check", 0, ""))
    problems = []
    if not signer.verify(sample):
        problems.append("self-check: a freshly signed receipt does not verify")
    if signer.verify(dataclasses.replace(sample, output=sample.output.replace("1", "2"))):
        problems.append("self-check: an edited receipt still verifies")
    if codec.decode(sample.codec, sample.output) != {"ok": (1, 2)}:
        problems.append("self-check: the codec does not round-trip")
    return problems


def _prune(args: argparse.Namespace, db: str | None) -> int:
    with _existing_store(db) as store:
        path = store.path if isinstance(store, SQLiteStore) else None
        before = path.stat().st_size if path else 0
        removed = store.prune(time.time())
        size = f"; {before} -> {path.stat().st_size} bytes" if path else ""
    print(f"pruned {removed['receipts']} expired receipts, {removed['leases']} finished "
          f"leases, {removed['lock_files']} stale lock files{size}")
    return 0


def _export(args: argparse.Namespace, db: str | None) -> int:
    with _existing_store(db) as store:
        receipts = list(store.iter_receipts())
    lines = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in receipts)
    if args.output:
        Path(args.output).write_text(lines)
    else:
        sys.stdout.write(lines)
    print(f"exported {len(receipts)} receipts", file=sys.stderr)
    return 0


def _read_receipts(handle: TextIO, name: str) -> list[Receipt]:
    receipts = []
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            data: Any = json.loads(line)
            receipts.append(Receipt(**{field: data[field] for field in _FIELDS}))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{name}:{number}: not a receipt exported by {PROG} ({exc!r})") from None
    return receipts


def _import(args: argparse.Namespace, db: str | None) -> int:
    if args.file == "-":
        receipts = _read_receipts(sys.stdin, "<stdin>")
    else:
        with open(args.file) as handle:
            receipts = _read_receipts(handle, args.file)
    existing = _is_redis(db) or sqlite_path(db).exists()
    if not existing and not os.environ.get(ENV_SECRET) \
            and not key_path_for(sqlite_path(db)).exists() and receipts:
        # A new key could check none of them: say how the key travels, and create nothing.
        raise UsageError(f"{sqlite_path(db)} is a new store with no key; the key that signed "
                         f"the receipts must travel with them: {_KEY_TRAVELS}")
    with _existing_store(db) if existing else _new_store(db) as store:
        signer = _signer(store)
        rejected = other_key = 0
        for receipt in receipts:
            if receipt.key_id == signer.key_id and _verifies(signer, receipt):
                store.import_receipt(receipt)
                continue
            rejected += 1
            other_key += receipt.key_id != signer.key_id
            why = "signed with another key" if receipt.key_id != signer.key_id else \
                "signature does not verify (edited)"
            print(f"FAIL {receipt.tool_name} {receipt.fingerprint[:16]}: {why}; not imported")
    print(f"imported {len(receipts) - rejected} of {len(receipts)} receipts")
    if other_key:
        print(f"{other_key} receipt(s) were signed with another key than this store's (key id "
              f"{signer.key_id}); the key must travel with them: {_KEY_TRAVELS}")
    return 1 if rejected else 0


_KEY_TRAVELS = (f"set {ENV_SECRET} to the content of the key file of the store they came from "
                f"(<store>.key), or copy that file beside this store as <this store>.key")


@contextmanager
def _new_store(db: str | None) -> Iterator[ReceiptStore]:
    with Singleflight(db) as sf:  # creates the store and its key file
        yield sf.store


_COMMANDS = {"demo": _demo, "openai-demo": _openai_demo, "langgraph-demo": _langgraph_demo,
             "summary": _summary, "verify": _verify, "prune": _prune,
             "export": _export, "import": _import}

if __name__ == "__main__":
    raise SystemExit(main())

"""The ``singleflight-agents`` command: demo, summary, verify, prune, export, import.

User mistakes print one line to stderr and exit 2; ``verify`` and ``import`` exit 1
when a receipt fails its check, ``export`` when a damaged one cannot be written. Output
cut short by its reader (``summary | head``) ends quietly with 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import math
import os
import signal
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from . import __version__, codec
from .demo import run_demo
from .engine import Singleflight
from .models import RECEIPT_FIELDS, Receipt, SingleflightError
from .reporting import format_json, format_markdown, format_summary
from .sessions import ignore_inherited_session
from .signing import ENV_SECRET, Signer, key_path_for, load_key
from .stats import damage, summarize
from .store import (
    DEFAULT_PATH,
    REDIS_SCHEMES,
    ReceiptStore,
    SQLiteStore,
    open_store,
    sqlite_path,
)

PROG = "singleflight-agents"


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
    return 128 + signal.SIGPIPE


def _shown(value: object) -> str:
    # A name edited in the store prints as one escaped token, never as lines of its own
    # (a forged "ok" line under a FAIL).
    text = str(value)
    return text if text.isprintable() else ascii(text)


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
    return Signer(load_key(None, store.key_path, create=False))


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
    if args.run is not None and not (args.run and _utf8(args.run)):
        raise UsageError(f"--run {args.run!r}: a run id is non-empty UTF-8 text; pass the id "
                         f"that summary, the report or $SINGLEFLIGHT_RUN_ID shows")
    with _existing_store(db) as store:
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


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes of another encoding on the command line
        return False
    return True


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


def _verify(args: argparse.Namespace, db: str | None) -> int:
    with _existing_store(db) as store:
        signer = _signer(store)
        store_problems = store.check() + _self_check(signer)
        bad: list[str] = []
        now = time.time()
        total = expired = foreign = 0
        for key, receipt in store.keyed_receipts():
            total += 1
            foreign += receipt.key_id != signer.key_id
            problem = _problem(signer, key, receipt)
            if problem is not None:
                bad.append(f"{_name(receipt)}: {problem}")
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


def _problem(signer: Signer, key: object, receipt: Receipt) -> str | None:
    # Every check the engine makes before serving a receipt it found under `key`
    # (Singleflight._trusted), so that what verify passes the engine serves.
    if receipt.key_id != signer.key_id:
        return f"signed with another key (key id {_shown(receipt.key_id)})"
    if not _verifies(signer, receipt):
        return "signature mismatch (edited after it was signed)"
    if key != receipt.fingerprint:
        return (f"stored under the key of fingerprint {_shown(key)[:16]}, not under its own "
                f"(moved in the store); the engine does not serve it")
    return None


def _name(receipt: Receipt) -> str:
    return f"{_shown(receipt.tool_name)} {_shown(receipt.fingerprint)[:16]}"


def _verifies(signer: Signer, receipt: Receipt) -> bool:
    try:
        return signer.verify(receipt)
    except (TypeError, ValueError):  # a field of the wrong type: edited in the store
        return False


def _self_check(signer: Signer) -> list[str]:
    now = time.time()
    sample = signer.sign(Receipt(
        fingerprint="0" * 64, tool_name="self.check", namespace="default", scope="default",
        version="1", inputs="{}", inputs_sha256="", codec=codec.JSON,
        output=codec.encode({"ok": (1, 2)})[1], created_at=now, expires_at=now, latency_ms=0.0,
        cost_usd=0.0, executor="self-check", token=0, key_id=""))
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
        removed = store.prune(time.time())
        size = (f"; {removed['bytes_before']} -> {removed['bytes_after']} bytes"
                if "bytes_after" in removed else "")
    print(f"pruned {removed['receipts']} expired receipts, {removed['leases']} finished "
          f"leases, {removed['lock_files']} stale lock files{size}")
    return 0


def _export(args: argparse.Namespace, db: str | None) -> int:
    if args.output == "":
        raise UsageError("-o needs a file name; leave it out to write to stdout")
    with _existing_store(db) as store:
        receipts = list(store.iter_receipts())
    lines, skipped = [], 0
    for receipt in receipts:
        fields = receipt.to_dict()
        try:
            if not all(_utf8(value) for value in fields.values() if isinstance(value, str)):
                raise ValueError("text that is not UTF-8")
            lines.append(json.dumps(fields, sort_keys=True, allow_nan=False) + "\n")
        except (TypeError, ValueError) as exc:  # bytes, NaN, bad text: edited in the store
            skipped += 1
            print(f"FAIL {_name(receipt)}: holds a value an export cannot carry ({exc}); "
                  f"damaged in the store (run verify); not exported", file=sys.stderr)
    if args.output is not None:
        _write_private(args.output, "".join(lines))
    else:
        sys.stdout.write("".join(lines))
    print(f"exported {len(lines)} of {len(receipts)} receipts" if skipped
          else f"exported {len(receipts)} receipts", file=sys.stderr)
    return 1 if skipped else 0


def _write_private(path: str, text: str) -> None:
    # An export holds every stored input and output: readable by this user only, as the
    # store and key are. Created 0600; a file already there is made 0600 before it is
    # emptied, so the new content is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not a pipe, a terminal or /dev/stdout
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot make {path} readable by this user only: "
                                 f"{exc.strerror}; write the export to a new file") from None
            os.ftruncate(fd, 0)
        handle.write(text)


def _read_receipts(lines: Iterable[bytes], name: str) -> list[Receipt]:
    receipts = []
    for number, raw in enumerate(lines, 1):
        where = f"{name}:{number}"
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not UTF-8 text, so not a file written by {PROG} "
                             f"export") from None
        if not line.strip():
            continue
        try:
            data: Any = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{where}: not a receipt exported by {PROG} (not JSON: "
                             f"{exc})") from None
        receipts.append(_receipt_from(data, where))
    return receipts


def _receipt_from(data: Any, where: str) -> Receipt:
    # Only the shape here: a field of the wrong type is one receipt's FAIL line in _import.
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a JSON {type(data).__name__}, not a receipt exported by "
                         f"{PROG}")
    missing = [name for name in RECEIPT_FIELDS if name not in data]
    if missing:
        raise UsageError(f"{where}: no field {missing[0]!r}, so not a receipt exported by "
                         f"{PROG}")
    return Receipt(*(data[name] for name in RECEIPT_FIELDS))


def _import(args: argparse.Namespace, db: str | None) -> int:
    if not args.file:
        raise UsageError("FILE is empty; pass a file written by export, or - for stdin")
    if args.file == "-":
        receipts = _read_receipts(sys.stdin.buffer, "<stdin>")
    else:
        with open(args.file, "rb") as handle:
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
            why = _import_problem(signer, receipt)
            if why is None:
                store.import_receipt(receipt)
                continue
            rejected += 1
            other_key += receipt.key_id != signer.key_id
            print(f"FAIL {_name(receipt)}: {why}; not imported")
    print(f"imported {len(receipts) - rejected} of {len(receipts)} receipts")
    if other_key:
        print(f"{other_key} receipt(s) were signed with another key than this store's (key id "
              f"{signer.key_id}); the key must travel with them: {_KEY_TRAVELS}")
    return 1 if rejected else 0


def _import_problem(signer: Signer, receipt: Receipt) -> str | None:
    if receipt.key_id != signer.key_id:
        return "signed with another key"
    if not _verifies(signer, receipt):
        return "signature does not verify (edited)"
    # Signed with our key, so only a holder of the key made it; still, no store can hold
    # NaN or lone surrogates, and the signature takes 1 and 1.0 as one number.
    for name, kinds in _FIELD_KINDS.items():
        if not _fits(getattr(receipt, name), kinds):
            return f"field {name!r} holds what {PROG} never exports"
    return None


# Receipt's annotations (strings: models uses postponed annotations) -> the JSON types
# export writes for them; a new kind of field fails here, at import of this module.
_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, type(None)), "float": (int, float), "int": (int,)}
_FIELD_KINDS = {field.name: _KINDS[str(field.type)] for field in dataclasses.fields(Receipt)}


def _fits(value: object, kinds: tuple[type, ...]) -> bool:
    if type(value) not in kinds:  # exact: true is not a number here
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, str) or _utf8(value)


_KEY_TRAVELS = (f"set {ENV_SECRET} to the content of the key file of the store they came from "
                f"(<store>.key), or copy that file beside this store as <this store>.key")


@contextmanager
def _new_store(db: str | None) -> Iterator[ReceiptStore]:
    with Singleflight(db) as sf:  # creates the store and its key file
        yield sf.store


_COMMANDS = {"demo": _demo, "openai-demo": _openai_demo, "langgraph-demo": _langgraph_demo,
             "mcp-demo": _mcp_demo,
             "summary": _summary, "verify": _verify, "prune": _prune,
             "export": _export, "import": _import}

if __name__ == "__main__":
    raise SystemExit(main())

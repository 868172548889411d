"""The receipt commands: ``verify`` (with the signer's self-check), ``export`` and ``import``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, TextIO

from . import codec
from ._cli_common import (
    PROG,
    Progress,
    UsageError,
    existing_store,
    is_terminal,
    new_store,
    store_signer,
    utf8,
)
from ._platform import O_CLOEXEC, has_posix_modes
from .models import RECEIPT_FIELDS, Receipt
from .signing import ENV_SECRET, Signer, key_path_for
from .store import is_sqlite_url, sqlite_path


def verify_store(args: argparse.Namespace, db: str | None) -> int:
    with existing_store(db) as store:
        signer = store_signer(store)
        store_problems = store.check() + _self_check(signer)
        bad: list[str] = []
        now = time.time()
        total = expired = foreign = 0
        with Progress("verify") as progress:
            for key, receipt in progress.counted(store.keyed_receipts()):
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
    # (_receipts._trusted), so that what verify passes the engine serves.
    if receipt.key_id != signer.key_id:
        return f"signed with another key (key id {_shown(receipt.key_id)})"
    if not _verifies(signer, receipt):
        return "signature mismatch (edited after it was signed)"
    if key != receipt.fingerprint:
        return (f"stored under the key of fingerprint {_shown(key)[:16]}, not under its own "
                f"(moved in the store); the engine does not serve it")
    return None


def _shown(value: object) -> str:
    # A name edited in the store prints as one escaped token, never as lines of its own
    # (a forged "ok" line under a FAIL).
    text = str(value)
    return text if text.isprintable() else ascii(text)


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


def export_receipts(args: argparse.Namespace, db: str | None) -> int:
    if args.output == "":
        raise UsageError("-o needs a file name; leave it out to write to stdout")
    exported = skipped = 0
    # Streamed: one receipt at a time from the store to the output, whatever its size.
    # On a terminal, the receipts themselves show the progress.
    show = args.output is not None or not is_terminal(sys.stdout)
    with existing_store(db) as store, _output(args.output) as out, \
            Progress("export", show=show) as progress:
        for receipt in progress.counted(store.iter_receipts()):
            fields = receipt.to_dict()
            try:
                if not all(utf8(value) for value in fields.values() if isinstance(value, str)):
                    raise ValueError("text that is not UTF-8")
                line = json.dumps(fields, sort_keys=True, allow_nan=False) + "\n"
            except (TypeError, ValueError) as exc:  # bytes, NaN, bad text: edited in the store
                skipped += 1
                progress.print(f"FAIL {_name(receipt)}: holds a value an export cannot carry "
                               f"({exc}); damaged in the store (run verify); not exported",
                               file=sys.stderr)
                continue
            out.write(line)
            exported += 1
    total = exported + skipped
    print(f"exported {exported} of {total} receipts" if skipped
          else f"exported {total} receipts", file=sys.stderr)
    return 1 if skipped else 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    # An export holds every stored input and output: readable by this user only, as the
    # store and key are. Created 0600; a file already there is made 0600 before it is
    # emptied, so the new content is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        # Not a pipe, a terminal or /dev/stdout; where mode bits mean nothing (Windows), the
        # folder's access list protects it (docs/security.md).
        if stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                if has_posix_modes():
                    os.fchmod(fd, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot make {path} readable by this user only: "
                                 f"{exc.strerror}; write the export to a new file") from None
            os.ftruncate(fd, 0)
        yield handle


def import_receipts(args: argparse.Namespace, db: str | None) -> int:
    if not args.file:
        raise UsageError("FILE is empty; pass a file written by export, or - for stdin")
    with _input(args.file) as (source, name), Progress("import") as progress:
        # Two passes, a line at a time: the first checks every line's shape (a malformed
        # line imports nothing, as before), the second imports.
        progress.what = "import, reading"
        total = sum(1 for _ in progress.counted(_read_receipts(source, name)))
        existing = not is_sqlite_url(db) or sqlite_path(db).exists()
        if not existing and not os.environ.get(ENV_SECRET) \
                and not key_path_for(sqlite_path(db)).exists() and total:
            # A new key could check none of them: say how the key travels, and create nothing.
            raise UsageError(f"{sqlite_path(db)} is a new store with no key; the key that "
                             f"signed the receipts must travel with them: {_KEY_TRAVELS}")
        with existing_store(db) if existing else new_store(db) as store:
            signer = store_signer(store)
            rejected = other_key = 0

            def accepted() -> Iterator[Receipt]:
                nonlocal rejected, other_key
                source.seek(0)
                for receipt in progress.counted(_read_receipts(source, name)):
                    why = _import_problem(signer, receipt)
                    if why is None:
                        yield receipt
                        continue
                    rejected += 1
                    other_key += receipt.key_id != signer.key_id
                    progress.print(f"FAIL {_name(receipt)}: {why}; not imported")

            progress.what, progress.count = "import", 0
            store.import_receipts(accepted())
    print(f"imported {total - rejected} of {total} receipts")
    if other_key:
        print(f"{other_key} receipt(s) were signed with another key than this store's (key id "
              f"{signer.key_id}); the key must travel with them: {_KEY_TRAVELS}")
    return 1 if rejected else 0


@contextlib.contextmanager
def _input(file: str) -> Iterator[tuple[BinaryIO, str]]:
    """The file to import, for reading twice: stdin, a pipe or any other stream that cannot
    be read again is copied to a temporary file first (unnamed, this user's only)."""
    with contextlib.ExitStack() as stack:
        if file == "-":
            source, name = sys.stdin.buffer, "<stdin>"
        else:
            source, name = stack.enter_context(open(file, "rb")), file
        if file != "-" and source.seekable():  # (stdin need not start at offset 0)
            yield source, name
            return
        spool = stack.enter_context(tempfile.TemporaryFile())
        shutil.copyfileobj(source, spool)
        spool.seek(0)
        yield spool, name


_KEY_TRAVELS = (f"set {ENV_SECRET} to the content of the key file of the store they came from "
                f"(<store>.key), or copy that file beside this store as <this store>.key")


def _read_receipts(lines: Iterable[bytes], name: str) -> Iterator[Receipt]:
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
        yield _receipt_from(data, where)


def _receipt_from(data: Any, where: str) -> Receipt:
    # Only the shape here: a field of the wrong type is one receipt's FAIL line in import.
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a JSON {type(data).__name__}, not a receipt exported by "
                         f"{PROG}")
    missing = [name for name in RECEIPT_FIELDS if name not in data]
    if missing:
        raise UsageError(f"{where}: no field {missing[0]!r}, so not a receipt exported by "
                         f"{PROG}")
    return Receipt(*(data[name] for name in RECEIPT_FIELDS))


def _import_problem(signer: Signer, receipt: Receipt) -> str | None:
    # verify's checks, but for the key and signature only (an imported receipt is stored
    # under its own fingerprint), then what no store can hold.
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
    return not isinstance(value, str) or utf8(value)

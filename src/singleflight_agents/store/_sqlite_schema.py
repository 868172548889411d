"""The SQLite store's schema: its tables and indexes, the receipt columns every statement
names, and the table of mode ``off`` made on first use."""

from __future__ import annotations

import sqlite3

from ..models import RECEIPT_FIELDS

SCHEMA_VERSION = 1
RECEIPT_COLUMNS = ", ".join(RECEIPT_FIELDS)  # one column per field, in the receipt's order
RECEIPT_VALUES = ", ".join("?" * len(RECEIPT_FIELDS))
TOOL_COLUMN, FINGERPRINT_COLUMN = RECEIPT_FIELDS.index("tool_name"), RECEIPT_FIELDS.index("fingerprint")
# The order of iter_receipts (export, verify), paged through by key.
TOOL_INDEX = "CREATE INDEX IF NOT EXISTS receipts_by_tool ON receipts (tool_name, fingerprint)"
SCHEMA = f"""
CREATE TABLE receipts ({RECEIPT_COLUMNS.replace("fingerprint,", "fingerprint TEXT PRIMARY KEY,", 1)});
CREATE INDEX receipts_by_expiry ON receipts (expires_at);
{TOOL_INDEX};
CREATE TABLE leases (
    fingerprint TEXT PRIMARY KEY, token INTEGER NOT NULL, owner TEXT NOT NULL,
    state TEXT NOT NULL, expires_at REAL NOT NULL, error_type TEXT, error_message TEXT
);
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('token', 0);
CREATE TABLE stats (
    run_id TEXT NOT NULL, process_id TEXT NOT NULL, tool_name TEXT NOT NULL,
    counters TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, process_id, tool_name)
);
"""
SEEN_SECONDS = 86400


def ensure_seen_table(conn: sqlite3.Connection) -> None:
    # Created on first use, so stores made before it need no migration.
    conn.execute("CREATE TABLE IF NOT EXISTS seen (run_id TEXT NOT NULL, fingerprint TEXT "
                 "NOT NULL, at REAL NOT NULL, PRIMARY KEY (run_id, fingerprint)) WITHOUT ROWID")

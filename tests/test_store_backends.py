"""A third store backend: chosen by its URL's scheme, and held to the shared suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SECRET

from singleflight_agents import Singleflight, Source, ToolExecutionOptions
from singleflight_agents.models import StoreError
from singleflight_agents.store import ReceiptStore, open_store, register_backend

ROOT = Path(__file__).resolve().parent.parent
SHARED = ToolExecutionOptions(tool_name="t.upper", deterministic=True)


def test_a_registered_scheme_opens_its_backend(tmp_path: Path) -> None:
    import _proxy_backend  # noqa: F401  (registers proxy://)

    url = f"proxy://{tmp_path / 'r.db'}"
    with Singleflight(store=url, secret=SECRET) as sf:
        sources = [sf.execute_sync(str.upper, "a", options=SHARED).source for _ in range(2)]
        assert sources == [Source.EXECUTED, Source.CACHE_HIT]
        assert isinstance(sf.store, ReceiptStore) and sf.store.key_path is not None


def test_bad_schemes_and_openers_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a scheme of its own"):
        register_backend("redis", open_store)
    with pytest.raises(ValueError, match="not a scheme of its own"):
        register_backend("My Store", open_store)
    register_backend("notastore", lambda url: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(StoreError, match="opened a object, not a ReceiptStore"):
        open_store("notastore://x")
    with pytest.raises(StoreError, match="unknown scheme 'nobody'"):
        open_store("nobody://x")


@pytest.mark.slow
def test_the_shared_suite_runs_on_a_third_backend(tmp_path: Path) -> None:
    """What docs/stores.md tells a backend's author to run, on the proxy backend."""
    env = {**os.environ, "SINGLEFLIGHT_TEST_BACKEND": "_proxy_backend",
           "SINGLEFLIGHT_TEST_STORE_URL": "proxy://{tmp}/receipts.db"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "extra",
         "tests/test_engine.py", "tests/test_do.py", "tests/test_receipts_and_store.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "[extra]" not in run.stdout

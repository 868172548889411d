"""An async call whose task is destroyed (its loop closed under it) while a store operation
runs in a store thread (a server's store): the collector returns, and whatever the operation took (a lease) is
given back, so no caller in this or another process waits it out."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from typing import Any

import pytest
from conftest import SECRET

from singleflight_agents import Singleflight, Source, ToolExecutionOptions
from singleflight_agents.store.base import Lease

OPTIONS = ToolExecutionOptions(tool_name="t.abandoned", deterministic=True,
                               wait_timeout_seconds=30, lease_seconds=600)


async def tool(x: int) -> int:
    return x


def _abandon_in_store_step(sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Start a call on a loop; close the loop while its acquire runs in a store thread
    (held there until then), and collect the task; what acquire returned."""
    taken: list[Any] = []
    acquired, closed = threading.Event(), threading.Event()
    acquire = sf.store.acquire

    def recording(*args: Any) -> Any:
        got = acquire(*args)
        taken.append(got)
        acquired.set()
        closed.wait(10)  # the flow never sees it before its loop is gone
        return got

    monkeypatch.setattr(sf.store, "acquire", recording)
    # A server's store (Redis) runs an async caller's store operations in store threads;
    # SQLite, as if it were one.
    monkeypatch.setattr(sf.store, "runs_on_loop", False)
    loop = asyncio.new_event_loop()
    task = loop.create_task(sf.execute(tool, 1, options=OPTIONS))
    loop.run_until_complete(asyncio.to_thread(acquired.wait, 10))
    loop.close()
    closed.set()
    alive = weakref.ref(task)
    del task
    # Collected once the store thread lets go of it (no event tells when: poll, bounded).
    # Collecting closes the coroutine: it must neither hang nor keep the lease.
    deadline = time.monotonic() + 10
    while alive() is not None:
        assert time.monotonic() < deadline, "the destroyed call's task was never collected"
        gc.collect()
        time.sleep(0.01)
    return taken


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_destroyed_call_gives_its_lease_back(store_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sf = Singleflight(store=store_url, secret=SECRET)
    other = Singleflight(store=store_url, secret=SECRET)
    try:
        assert sf.execute_sync(tool, 0, options=OPTIONS).source is Source.EXECUTED  # opened
        taken = _abandon_in_store_step(sf, monkeypatch)
        assert len(taken) == 1 and isinstance(taken[0], Lease)
        # Held, another engine would wait 30 s and then run unshared (EXECUTED_FALLBACK).
        assert other.execute_sync(tool, 1, options=OPTIONS).source is Source.EXECUTED
        # and this process's flight was handed over, not left to be joined forever
        assert sf.execute_sync(tool, 2, options=OPTIONS).source is Source.EXECUTED
    finally:
        sf.close()
        other.close()


@pytest.mark.parametrize("offload", [False, True])
def test_a_redis_store_runs_async_store_operations_where_its_url_says(
        redis_url: str, offload: bool) -> None:
    url = redis_url + ("&offload=1" if offload else "")
    sf = Singleflight(store=url, secret=SECRET)
    threads: list[str] = []
    try:
        assert sf.store.runs_on_loop is not offload
        acquire = sf.store.acquire

        def recording(*args: Any) -> Any:
            threads.append(threading.current_thread().name)
            return acquire(*args)

        sf.store.acquire = recording  # type: ignore[method-assign]
        sf.execute_sync(tool, 0, options=OPTIONS)  # opens the store
        assert asyncio.run(sf.execute(tool, 1, options=OPTIONS)).source is Source.EXECUTED
        on_loop = threads[-1] == threading.main_thread().name
        assert on_loop is not offload and (on_loop or threads[-1].startswith("singleflight-store"))
    finally:
        sf.close()


def test_a_bad_offload_value_is_refused(redis_url: str) -> None:
    from singleflight_agents import StoreError

    with pytest.raises(StoreError, match=r"offload='yes' is not 0 or 1; write offload=1"):
        Singleflight(store=redis_url + "&offload=yes", secret=SECRET).store  # noqa: B018

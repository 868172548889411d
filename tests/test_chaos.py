"""Chaos on each store: 8 spawned worker processes call 50 keys with random latencies and
failures while a driver SIGKILLs a random one every 0.5-1 s and starts a replacement.

The workers, the driver and the checks live in ``_chaos_workers.py``, whose docstring
states the invariant exactly. In short, from the log every process appended to:
(a) no leased execution of a key overlaps an earlier one whose worker was alive, and none
starts while a stored receipt of the key is still valid (fallbacks are counted, not
failed); (b) every worker that was not killed finished every call and its loop;
(c) every value or error a caller got came from an execution of the same key.

``bench/chaos.py`` runs the same for minutes. ``SINGLEFLIGHT_CHAOS_SEED`` picks the seed
(the key sequence, latencies, failures and victims; the timing is the machine's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _chaos_workers as chaos
import pytest
from conftest import SECRET

SEED = int(os.environ.get("SINGLEFLIGHT_CHAOS_SEED", "20261127"))

pytestmark = pytest.mark.timeout(60)  # about 12-15 s per store; the driver bounds the rest


@pytest.mark.slow
def test_chaos_no_duplicates_no_hangs_right_values(store_url: str, tmp_path: Path) -> None:
    report = chaos.run(store_url, SECRET, str(tmp_path), processes=8, seconds=10.0, seed=SEED,
                       grace=10.0)
    print(f"\nseed {SEED}\n{report.figures()}")
    assert not report.violations, "\n".join(report.violations[:20])
    assert report.duplicates == 0
    if report.store == "sqlite":  # flock leases never lapse under a live holder
        assert report.lapses == 0

    # The chaos happened: otherwise the checks above passed vacuously.
    assert report.kills >= 5, report.kills
    assert report.killed_executions >= 1, "no worker was killed inside a tool"
    assert report.takeovers >= 1, "no killed holder's lease was taken over"
    assert report.failed_executions >= 1 and report.errors["ToolFailure"] >= 1
    assert report.executions >= 100
    for source in ("executed", "cache_hit", "shared_wait"):
        assert report.sources[source] >= 1, report.sources


# -- the checks themselves, on made-up logs: each kind of violation is flagged ------------------

K, K2 = chaos.name_of(chaos.KEYS[1]), chaos.name_of(chaos.KEYS[2])


def _start(nonce: str, t: float, token: int | None, key: str = K, wid: int = 0,
           takeover: bool = False) -> dict[str, object]:
    fp = None if token is None else f"fp-{key}"
    return {"ev": "start", "wid": wid, "key": key, "nonce": nonce, "fp": fp, "token": token,
            "takeover": takeover, "acq0": None if token is None else t - 0.001, "t": t}


def _end(nonce: str, t: float, ok: bool = True) -> dict[str, object]:
    return {"ev": "end", "nonce": nonce, "ok": ok, "t": t}


def _put(token: int, t: float, stored: bool = True, key: str = K) -> dict[str, object]:
    return {"ev": "put", "fp": f"fp-{key}", "token": token, "stored": stored, "created": t,
            "expires": t + 100}


def _call(wid: int, t: float, source: str, nonce: str, key: str = K) -> dict[str, object]:
    return {"ev": "call", "wid": wid, "key": key, "t0": t - 0.01, "t1": t, "source": source,
            "nonce": nonce, "vkey": key, "takeover": False}


CLEAN = [_start("0.0", 1.0, 1), _end("0.0", 1.1), _put(1, 1.1),
         _call(0, 1.2, "executed", "0.0"), _call(1, 1.3, "cache_hit", "0.0"),
         {"ev": "done", "wid": 0, "calls": 1}, {"ev": "done", "wid": 1, "calls": 1}]
VIOLATIONS = {
    # a second leased execution while the first one's worker was alive and running
    "(a1)": [_start("0.0", 1.0, 1), _start("1.0", 1.05, 2, wid=1, takeover=True),
             _end("0.0", 1.1, ok=False), _end("1.0", 1.2, ok=False)],
    # a leased execution while a stored receipt was valid
    "(a2)": [*CLEAN[:3], _start("1.0", 5.0, 2, wid=1), _end("1.0", 5.1)],
    # a value of another key, and a cached value whose receipt was fenced out
    "(c) worker 1": [*CLEAN[:3], _call(1, 1.3, "cache_hit", "0.0", key=K2)],
    "(c) worker 2": [_start("0.0", 1.0, 1), _end("0.0", 1.1), _put(1, 1.1, stored=False),
                     _call(2, 1.3, "shared_wait", "0.0")],
    # an error no execution raised
    "(c) worker 3": [{"ev": "call", "wid": 3, "key": K, "t0": 1.0, "t1": 1.1, "err": "KeyError",
                      "msg": "x"}],
    # an execution that never ended in a worker nobody killed; a worker short of calls
    "(b) execution": [_start("0.0", 1.0, 1)],
    "(b) worker 0 made": [{"ev": "done", "wid": 0, "calls": 2}, _call(0, 1.2, "executed", "9.9")],
}


def _analyse(tmp_path: Path, lines: list[dict[str, object]],
             kills: dict[int, tuple[float, str]] | None = None) -> chaos.Report:
    log = tmp_path / "chaos.log"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return chaos.analyse(str(log), store=str(tmp_path / "receipts.db"), secret=SECRET,
                         kills=kills or {}, problems=[])


def test_the_checker_passes_a_clean_log_and_allows_takeover_of_a_killed_holder(
        tmp_path: Path) -> None:
    assert _analyse(tmp_path, CLEAN).violations == []
    # the first holder was killed at 1.05 s, before its successor started: no violation
    killed = [_start("0.0", 1.0, 1), _start("1.0", 1.06, 2, wid=1, takeover=True),
              _end("1.0", 1.2), _put(2, 1.2), _call(1, 1.3, "executed", "1.0"),
              # a fallback inside the receipt's lifetime is counted, not failed
              _start("2.0", 1.5, None, wid=2), _end("2.0", 1.6),
              _call(2, 1.7, "executed_fallback", "2.0")]
    report = _analyse(tmp_path, killed, kills={0: (1.05, "executing")})
    assert report.violations == [], report.violations
    assert (report.killed_executions, report.takeovers, report.fallbacks_in_ttl) == (1, 1, 1)


@pytest.mark.parametrize("kind", list(VIOLATIONS))
def test_the_checker_flags(tmp_path: Path, kind: str) -> None:
    report = _analyse(tmp_path, VIOLATIONS[kind])
    assert any(v.startswith(kind) for v in report.violations), report.violations

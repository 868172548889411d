"""Chaos: worker processes call tools through one store while a driver SIGKILLs them.

Used by ``test_chaos.py`` (a short run on each store) and ``bench/chaos.py`` (a long
one). ``run()`` spawns the workers, kills random ones mid-call and starts replacements,
then ``analyse()`` checks the log every process appended to.

Workers (spawned, so each is a fresh interpreter) each open
``Singleflight(store=url, secret=...)`` and loop until a shared deadline, calling one
of 50 keys (tool, topic, page) chosen by a seeded RNG, through ``execute_sync`` or
``await execute`` (sync or async tool) by worker id. Tools sleep 3-100 ms
(log-uniform) and raise ``ToolFailure`` 10% of the time; leases are 0.5 s, waits time
out after 1 s (after 30 ms on every seventh key, so that fallbacks happen on both
stores); half the keys have a 1 s TTL (re-executed all along), the others an hour;
every fifth key shares failures. The engine's store object is instrumented in place
(its ``acquire``, ``release``, ``put`` and ``wait`` wrapped), which tells each
execution whether it runs under a lease (and which token) or without one (a fallback),
and logs every ``put`` with its outcome.

Log lines (JSON, one ``os.write`` on an ``O_APPEND`` fd each, so lines never mix):
``start`` (wid, key, nonce, fingerprint, token or null, takeover, time of the acquire
call, time), ``end`` (nonce, ok, time), ``put`` (fingerprint, token, stored, receipt
created/expires), ``call`` (wid, key, t0, t1, source + served nonce, or error + the
nonce named in it), ``done`` (wid, calls), ``crash``. The driver keeps the kills.

The invariant checked (``analyse``), per key. A *leased* execution is one whose tool ran
while its thread held a lease; its interval is [start, end], or [start, kill time] when
its worker was killed before it ended (an execution with no end and no kill is a
violation). Tokens come from one counter, so leased executions of a key are ordered.

(a1) Mutual exclusion: a leased execution B never starts inside the interval of an
     earlier-token leased execution A of the same key. So overlaps happen only after
     A's worker was killed (its interval ends at the kill), and re-executions after a
     failure start after the failure ended. One exception, Redis only: a lease lapsed
     while A's worker lived (stalled past the term). It is counted as a lapse and allowed
     only if B is a takeover, started at least ``lease_seconds`` after A called acquire
     (the earliest moment A's lease could lapse), and A's receipt was fenced out.
(a2) No re-execution within TTL: for every receipt a ``put`` stored (logged stored=true,
     expiring at X), no leased execution with a larger token starts before X (a 5 ms
     allowance for Redis's millisecond expiry). Sound because a holder with a larger
     token took the lease after that put committed (taken before, it would have fenced
     the put out) and looked the receipt up once more while holding it. On the
     one-hour keys this says: nothing leased runs after the first stored execution.
     Fallbacks (no lease) are allowed: they are counted, and those inside a receipt's
     lifetime counted separately. Executions that raised, were killed or were fenced out
     store nothing, so the next one is legitimate.
(b)  No hang: every worker that was not killed exits 0 with a ``done`` line whose call
     count equals its ``call`` lines, before ``grace`` seconds after the deadline, and
     no call takes more than ``MAX_CALL_SECONDS``.
(c)  Right values: a served value names the call's key, and its nonce belongs to an
     execution of that key that ended without raising: by the caller itself for
     ``executed`` (leased) and ``executed_fallback`` (no lease); leased and not fenced
     out for ``cache_hit`` and ``shared_wait``. An error names the failed execution of
     that key: the caller's own for ``ToolFailure``, a leased one for
     ``SharedExecutionError`` (only on keys that share failures). Any other error is a
     violation. No execution is served as ``executed*`` twice. Each key has one
     fingerprint; the receipts left in the store verify and carry the nonce and token of
     a leased execution of their key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import threading
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from singleflight_agents import (
    SharedExecutionError,
    Singleflight,
    ToolExecutionOptions,
    make_fingerprint,
)
from singleflight_agents.codec import decode
from singleflight_agents.store import REDIS_SCHEMES
from singleflight_agents.store.base import Lease

SPAWN = multiprocessing.get_context("spawn")
LEASE_SECONDS, WAIT_TIMEOUT_SECONDS, IMPATIENT_WAIT = 0.5, 1.0, 0.03
SHORT_TTL, LONG_TTL = 1.0, 3600.0
FAILURE_RATE, LATENCY = 0.1, (0.003, 0.1)
MAX_CALL_SECONDS = 5.0  # bound on one call: ~wait timeout + tool; more is a hang in the making
EXPIRY_SLACK = 0.005
STARTING, IDLE, EXECUTING, FALLBACK, WAITING = -1, 0, 1, 2, 3  # a worker's state, shared


def _make_keys() -> list[tuple[str, str, int]]:
    rng = random.Random("chaos-keys")
    topics = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "zeta"]
    keys: set[tuple[str, str, int]] = set()
    while len(keys) < 50:
        keys.add((rng.choice(["chaos.search", "chaos.fetch"]), rng.choice(topics), rng.randint(1, 9)))
    return sorted(keys)


KEYS = _make_keys()
OPTIONS = {key: ToolExecutionOptions(
    tool_name=key[0], deterministic=True, lease_seconds=LEASE_SECONDS,
    wait_timeout_seconds=IMPATIENT_WAIT if i % 7 == 3 else WAIT_TIMEOUT_SECONDS,
    ttl_seconds=LONG_TTL if i % 2 else SHORT_TTL,
    share_failures=i % 5 == 0) for i, key in enumerate(KEYS)}
SHARES_FAILURES = {"/".join(map(str, k)) for k, o in OPTIONS.items() if o.share_failures}


def name_of(key: tuple[str, str, int]) -> str:
    return "/".join(map(str, key))


# -- in the worker processes ---------------------------------------------------------

W: dict[str, Any] = {}  # this worker: wid, slot, states, fd, rng, seq
_HELD = threading.local()  # the lease this thread holds, if any, and when it was asked for
# An async call's lease is taken in a store thread, and its tool runs on the loop: the lease
# waits here, by fingerprint, for the tool's start to claim it.
_HELD_BY_FP: dict[str, tuple[Lease, float]] = {}
_HELD_LOCK = threading.Lock()


class ToolFailure(RuntimeError):
    pass


def _log(**fields: Any) -> None:
    os.write(W["fd"], (json.dumps(fields, separators=(",", ":")) + "\n").encode())


def _state(value: int) -> None:
    W["states"][W["slot"]] = value


def _begin(key: str, fp: str) -> tuple[str, float, bool]:
    lease: Lease | None = getattr(_HELD, "lease", None)
    acq0 = getattr(_HELD, "acq0", None)
    if lease is None:
        with _HELD_LOCK:
            lease, acq0 = _HELD_BY_FP.pop(fp, (None, None))
    nonce = f"{W['wid']}.{next(W['seq'])}"
    rng = W["tool_rng"]
    latency = math.exp(rng.uniform(math.log(LATENCY[0]), math.log(LATENCY[1])))
    _state(EXECUTING if lease else FALLBACK)
    _log(ev="start", wid=W["wid"], key=key, nonce=nonce, fp=lease.key if lease else None,
         token=lease.token if lease else None, takeover=bool(lease and lease.takeover),
         acq0=acq0 if lease else None, t=time.time())
    return nonce, latency, rng.random() < FAILURE_RATE


def _end(key: str, nonce: str, fail: bool) -> dict[str, Any]:
    _log(ev="end", nonce=nonce, ok=not fail, t=time.time())
    _state(IDLE)
    if fail:
        raise ToolFailure(f"boom {nonce}")
    return {"key": key, "nonce": nonce}


def chaos_tool(tool: str, topic: str, page: int) -> dict[str, Any]:
    key = f"{tool}/{topic}/{page}"
    nonce, latency, fail = _begin(key, _fingerprint(tool, topic, page))
    time.sleep(latency)
    return _end(key, nonce, fail)


async def chaos_tool_async(tool: str, topic: str, page: int) -> dict[str, Any]:
    key = f"{tool}/{topic}/{page}"
    nonce, latency, fail = _begin(key, _fingerprint(tool, topic, page))
    await asyncio.sleep(latency)
    return _end(key, nonce, fail)


def _fingerprint(tool: str, topic: str, page: int) -> str:
    return make_fingerprint(tool, {"tool": tool, "topic": topic, "page": page})


def _instrument(store: Any) -> None:
    acquire, release, put, wait = store.acquire, store.release, store.put, store.wait

    def acquire_(key: str, owner: str, lease_seconds: float) -> Any:
        asked = time.time()
        got = acquire(key, owner, lease_seconds)
        if isinstance(got, Lease):
            if threading.current_thread().name.startswith("singleflight-store"):
                with _HELD_LOCK:
                    _HELD_BY_FP[key] = (got, asked)
            else:
                _HELD.lease, _HELD.acq0 = got, asked
        return got

    def drop(lease: Lease) -> None:
        if getattr(_HELD, "lease", None) is lease:
            _HELD.lease = None
        with _HELD_LOCK:
            if _HELD_BY_FP.get(lease.key, (None,))[0] is lease:
                del _HELD_BY_FP[lease.key]

    def release_(lease: Lease, failure: Any = None) -> None:
        drop(lease)
        release(lease, failure)

    def put_(receipt: Any, lease: Lease) -> bool:
        drop(lease)
        stored = None
        try:
            stored = put(receipt, lease)
            return bool(stored)
        finally:
            _log(ev="put", fp=lease.key, token=lease.token, stored=stored,
                 created=receipt.created_at, expires=receipt.expires_at)

    def wait_(key: str, timeout: float) -> None:
        _state(WAITING)
        try:
            wait(key, timeout)
        finally:
            _state(IDLE)

    store.acquire, store.release, store.put, store.wait = acquire_, release_, put_, wait_


def _outcome(call: Any) -> dict[str, Any]:
    """Run one call; what the caller got, for its ``call`` line."""
    try:
        out = call()
    except ToolFailure as exc:
        return {"err": "ToolFailure", "nonce": str(exc).removeprefix("boom ")}
    except SharedExecutionError as exc:
        return {"err": "SharedExecutionError", "etype": exc.error_type,
                "nonce": exc.error_message.removeprefix("boom ")}
    except Exception as exc:
        return {"err": type(exc).__name__, "msg": str(exc)[:300]}
    value = out.value
    return {"source": str(out.source), "nonce": value.get("nonce"), "vkey": value.get("key"),
            "takeover": out.takeover}


def worker(wid: int, slot: int, spec: dict[str, Any], states: Any, go: Any, stop_at: Any) -> None:
    W.update(wid=wid, slot=slot, states=states, seq=itertools.count(),
             fd=os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    try:
        warnings.simplefilter("ignore")  # fallbacks warn; the log counts them
        rng = random.Random(f"{spec['seed']}:calls:{wid}")
        W["tool_rng"] = random.Random(f"{spec['seed']}:tools:{wid}")
        sf = Singleflight(store=spec["store"], secret=spec["secret"], run_id=spec["run_id"])
        _instrument(sf.store)
        mode = ("sync", "async", "async-sync-tool")[wid % 3]
        think = spec["think"]
        _state(IDLE)
        go.wait()

        def record(key: tuple[str, str, int], t0: float, got: dict[str, Any]) -> None:
            _log(ev="call", wid=wid, key=name_of(key), t0=t0, t1=time.time(), **got)

        calls = 0
        if mode == "sync":
            while time.time() < stop_at.value:
                key, t0 = rng.choice(KEYS), time.time()
                record(key, t0, _outcome(lambda k=key: sf.execute_sync(
                    chaos_tool, *k, options=OPTIONS[k])))
                calls += 1
                time.sleep(rng.uniform(*think))
        else:
            tool = chaos_tool_async if mode == "async" else chaos_tool

            async def loop() -> int:
                n = 0
                while time.time() < stop_at.value:
                    key, t0 = rng.choice(KEYS), time.time()
                    try:
                        thunk = _returning(await sf.execute(tool, *key, options=OPTIONS[key]))
                    except Exception as exc:
                        thunk = _Raise(exc)
                    record(key, t0, _outcome(thunk))
                    n += 1
                    await asyncio.sleep(rng.uniform(*think))
                return n

            calls = asyncio.run(loop())
        _log(ev="done", wid=wid, calls=calls)
        sf.close()
    except BaseException:
        _log(ev="crash", wid=wid, tb=traceback.format_exc())
        raise


class _Raise:
    """An async call's outcome, replayed through ``_outcome``: returns it or raises."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self) -> Any:
        raise self.exc


def _returning(value: Any) -> Any:
    return lambda: value


# -- the driver -----------------------------------------------------------------------


@dataclass
class Report:
    store: str
    seconds: float = 0.0
    workers: int = 0
    calls: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    executions: int = 0  # leased; the next two count among them
    failed_executions: int = 0
    killed_executions: int = 0
    fallback_executions: int = 0  # no lease
    fallbacks_in_ttl: int = 0
    kills: int = 0
    kills_by_state: Counter[str] = field(default_factory=Counter)
    takeovers: int = 0
    lapses: int = 0  # Redis: lease lapsed under a live, stalled holder (fenced)
    stored: int = 0
    fenced: int = 0
    duplicates: int = 0  # (a1) and (a2) violations
    max_call: float = 0.0
    p99_call: float = 0.0
    violations: list[str] = field(default_factory=list)

    def figures(self) -> str:
        rate = self.calls / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"store {self.store}: {self.seconds:.1f} s, {self.workers} worker processes started, "
            f"{self.kills} SIGKILLs (at kill: {dict(self.kills_by_state)})",
            f"  calls {self.calls:,} ({rate:,.0f}/s); sources {dict(self.sources)}; "
            f"errors {dict(self.errors)}",
            f"  leased executions {self.executions:,} ({self.failed_executions} raised, "
            f"{self.killed_executions} killed mid-run, {self.takeovers} takeovers); "
            f"fallback executions {self.fallback_executions} ({self.fallbacks_in_ttl} while a "
            f"receipt was valid)",
            f"  receipts stored {self.stored:,}, fenced out {self.fenced}, lease lapses under a "
            f"live holder {self.lapses}",
            f"  call latency p99 {self.p99_call * 1000:.1f} ms, max {self.max_call * 1000:.1f} ms",
            f"  duplicate executions found {self.duplicates}; violations {len(self.violations)}",
        ])


def _victim(rng: random.Random, states: Any, procs: dict[int, tuple[int, Any]]) -> int | None:
    """A slot to kill: mostly a worker inside a tool, sometimes one waiting, or any."""
    want = rng.choices((EXECUTING, WAITING, None), weights=(0.7, 0.2, 0.1))[0]
    deadline = time.time() + 0.5
    while True:
        ready = [s for s in procs if states[s] != STARTING]
        matching = [s for s in ready if want is None or states[s] == want]
        if matching:
            return rng.choice(matching)
        if time.time() > deadline:
            return rng.choice(ready) if ready else None
        time.sleep(0.002)


def run(store: str, secret: str, workdir: str, *, processes: int = 8, seconds: float = 10.0,
        seed: int = 1, kill_every: tuple[float, float] = (0.5, 1.0),
        think: tuple[float, float] = (0.0, 0.004), grace: float = 10.0) -> Report:
    """Run the chaos for ``seconds`` and check the log; see the module docstring."""
    log = os.path.join(workdir, "chaos.log")
    spec = {"store": store, "secret": secret, "log": log, "seed": seed, "think": think,
            "run_id": f"chaos-{os.urandom(3).hex()}"}
    rng = random.Random(seed)
    states, stop_at, go = SPAWN.RawArray("i", processes), SPAWN.RawValue("d", math.inf), SPAWN.Event()
    procs: dict[int, tuple[int, Any]] = {}
    wids = itertools.count()
    kills: dict[int, tuple[float, str]] = {}
    problems: list[str] = []
    names = {STARTING: "starting", IDLE: "idle", EXECUTING: "executing", FALLBACK: "fallback",
             WAITING: "waiting"}

    def start(slot: int) -> None:
        states[slot] = STARTING
        wid = next(wids)
        proc = SPAWN.Process(target=worker, args=(wid, slot, spec, states, go, stop_at),
                             daemon=True, name=f"chaos-{wid}")
        proc.start()
        procs[slot] = (wid, proc)

    try:
        for slot in range(processes):
            start(slot)
        ready_by = time.time() + 60
        while any(states[s] == STARTING for s in procs):
            if time.time() > ready_by or any(p.exitcode is not None for _, p in procs.values()):
                raise RuntimeError(f"chaos workers did not start; see {log}")
            time.sleep(0.01)
        t_go = time.time()
        stop_at.value = t_go + seconds
        go.set()
        next_kill = t_go + rng.uniform(*kill_every)
        while next_kill < stop_at.value - 0.3:
            time.sleep(max(0.0, next_kill - time.time()))
            victim = _victim(rng, states, procs)
            if victim is not None:
                wid, proc = procs[victim]
                kills[wid] = (time.time(), names[states[victim]])
                os.kill(proc.pid, signal.SIGKILL)  # not reaped yet, so the pid is still its own
                proc.join(10)
                start(victim)
            next_kill = time.time() + rng.uniform(*kill_every)
        for wid, proc in procs.values():
            proc.join(max(0.1, stop_at.value + grace - time.time()))
            if proc.is_alive():
                problems.append(f"(b) worker {wid} still running {grace:.0f} s after the deadline")
            elif proc.exitcode != 0:
                problems.append(f"(b) worker {wid} exited with {proc.exitcode}")
        elapsed = time.time() - t_go
    finally:
        for _, proc in procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    report = analyse(log, store=store, secret=secret, kills=kills, problems=problems)
    report.seconds, report.workers = elapsed, next(wids)
    return report


# -- the checks ---------------------------------------------------------------------------


def analyse(log: str, *, store: str, secret: str, kills: dict[int, tuple[float, str]],
            problems: list[str]) -> Report:
    redis = store.startswith(REDIS_SCHEMES)
    rep = Report(store="redis" if redis else "sqlite", violations=list(problems))
    bad = rep.violations.append
    execs: dict[str, dict[str, Any]] = {}
    puts: dict[tuple[str, int], dict[str, Any]] = {}
    calls: list[dict[str, Any]] = []
    done: dict[int, int] = {}
    with open(log) as handle:
        for line in handle:
            rec = json.loads(line)
            ev = rec.pop("ev")
            if ev == "start":
                execs[rec["nonce"]] = rec
            elif ev == "end":
                execs[rec["nonce"]].update(end=rec["t"], ok=rec["ok"])
            elif ev == "put":
                puts[(rec["fp"], rec["token"])] = rec
            elif ev == "call":
                calls.append(rec)
            elif ev == "done":
                done[rec["wid"]] = rec["calls"]
            elif ev == "crash":
                bad(f"(b) worker {rec['wid']} crashed: {rec['tb']}")
    rep.kills = len(kills)
    rep.kills_by_state = Counter(state for _, state in kills.values())

    # executions: each ended, or its worker was killed; one fingerprint per key
    fp_of: dict[str, str] = {}
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in execs.values():
        if "end" not in ex:
            killed = kills.get(ex["wid"])
            if killed is None or killed[0] < ex["t"]:
                bad(f"(b) execution {ex['nonce']} of {ex['key']} never ended and its worker "
                    f"was not killed during it")
                continue
            ex["end"], ex["ok"] = killed[0], None
        if ex["token"] is None:
            rep.fallback_executions += 1
            continue
        rep.executions += 1
        rep.failed_executions += ex["ok"] is False
        rep.killed_executions += ex["ok"] is None
        rep.takeovers += ex["takeover"]
        if fp_of.setdefault(ex["key"], ex["fp"]) != ex["fp"]:
            bad(f"key {ex['key']} ran under two fingerprints")
        by_key[ex["key"]].append(ex)
    if len(set(fp_of.values())) != len(fp_of):
        bad("two keys share a fingerprint")
    for p in puts.values():
        rep.stored += p["stored"] is True
        rep.fenced += p["stored"] is False

    # (a1) mutual exclusion and (a2) no re-execution while a stored receipt is valid
    for key, runs in by_key.items():
        runs.sort(key=lambda ex: ex["token"])
        receipts: list[dict[str, Any]] = []
        for i, b in enumerate(runs):
            if i and runs[i - 1]["token"] == b["token"]:
                bad(f"(a1) {key}: token {b['token']} ran twice")
                rep.duplicates += 1
            for a in runs[:i]:
                if b["t"] >= a["end"]:
                    continue
                fenced = puts.get((a["fp"], a["token"]), {}).get("stored") is not True
                if (redis and b["takeover"] and fenced
                        and b["t"] >= a["acq0"] + LEASE_SECONDS - EXPIRY_SLACK):
                    rep.lapses += 1
                    continue
                rep.duplicates += 1
                bad(f"(a1) {key}: {b['nonce']} (token {b['token']}, takeover {b['takeover']}) "
                    f"started {a['end'] - b['t']:.4f} s before {a['nonce']} (token {a['token']}, "
                    f"worker alive: {a['wid'] not in kills}) ended")
            for r in receipts:
                if b["t"] < r["expires"] - EXPIRY_SLACK:
                    rep.duplicates += 1
                    bad(f"(a2) {key}: {b['nonce']} (token {b['token']}) started "
                        f"{r['expires'] - b['t']:.3f} s before the receipt of token {r['token']} "
                        f"expired")
            put = puts.get((b["fp"], b["token"]))
            if put is not None and put["stored"]:
                receipts.append(put)
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, runs in by_key.items():
        windows[key] = [(put["created"], put["expires"]) for ex in runs
                        if (put := puts.get((ex["fp"], ex["token"]))) and put["stored"]]
    for ex in execs.values():
        if ex["token"] is None and any(c <= ex["t"] < x for c, x in windows[ex["key"]]):
            rep.fallbacks_in_ttl += 1

    # (b) every live worker finished every call it started, none slowly
    per_worker = Counter(c["wid"] for c in calls)
    for wid, n in done.items():
        if per_worker[wid] != n:
            bad(f"(b) worker {wid} made {n} calls but logged {per_worker[wid]}")
    durations = sorted(c["t1"] - c["t0"] for c in calls)
    rep.calls = len(calls)
    if durations:
        rep.max_call, rep.p99_call = durations[-1], durations[int(0.99 * (len(durations) - 1))]
    for c in calls:
        if c["t1"] - c["t0"] > MAX_CALL_SECONDS:
            bad(f"(b) a call of {c['key']} by worker {c['wid']} took {c['t1'] - c['t0']:.1f} s")

    # (c) served values and errors come from an execution of the same key
    served_own = Counter(c["nonce"] for c in calls if c.get("source", "").startswith("executed"))
    for nonce, n in served_own.items():
        if n > 1:
            bad(f"(c) the value of execution {nonce} was served as the caller's own {n} times")
    for c in calls:
        if "source" in c:
            rep.sources[c["source"]] += 1
        else:
            rep.errors[c["err"]] += 1
        origin = execs.get(c["nonce"]) if c.get("nonce") else None
        if origin is None or not _came_from(c, origin, puts):
            bad(f"(c) worker {c['wid']} call of {c['key']} got {c.get('source') or c.get('err')} "
                f"{c.get('nonce')} {c.get('msg', '')}: {origin}")

    # the receipts left in the store
    with Singleflight(store=store, secret=secret) as sf:
        for key, fp in fp_of.items():
            receipt = sf.store.get(fp)
            if receipt is None:
                continue
            value = decode(receipt.codec, receipt.output)
            origin = execs.get(value.get("nonce"))
            if not (sf.verify_receipt(receipt) and value.get("key") == key and origin is not None
                    and origin["key"] == key and origin["token"] == receipt.token):
                bad(f"(c) the stored receipt of {key} (token {receipt.token}) is not that of a "
                    f"leased execution of {key}: {value} {origin}")
    return rep


def _came_from(call: dict[str, Any], origin: dict[str, Any],
               puts: dict[tuple[str, int], dict[str, Any]]) -> bool:
    """Whether what ``call`` got (a value or an error) can have come from ``origin``."""
    same_key: bool = origin["key"] == call["key"]
    own: bool = origin["wid"] == call["wid"]
    leased = origin["token"] is not None
    source = call.get("source")
    if source is not None:
        if not (same_key and call["vkey"] == call["key"] and origin["ok"] is True):
            return False
        if source == "executed":
            return own and leased
        if source == "executed_fallback":
            return own and not leased
        stored = puts.get((origin["fp"], origin["token"]), {}).get("stored")
        return source in ("cache_hit", "shared_wait") and leased and stored is not False
    if not (same_key and origin["ok"] is False):
        return False
    if call["err"] == "ToolFailure":
        return own
    return call["err"] == "SharedExecutionError" and leased and call["key"] in SHARES_FAILURES

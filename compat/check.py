"""The verdict of a compatibility run: the outcomes the swap plugin wrote, against
compat/expected.txt, and the schema log.

    python compat/check.py failed OUTCOMES
    python compat/check.py verdict SUITE OUTCOMES SCHEMA_LOG UNSWAPPED_OUTCOMES

``failed`` prints the node ids that failed, one a line (an ``@file`` for pytest), for
.ci/compat to run them again with nothing swapped (``$COMPAT_SWAP=none``): a test that fails
that way too fails because of the environment (an optional dependency not installed, a
release of ``openai`` its tests do not expect), not because of our adapters, and counts for
nothing. ``verdict`` exits 1 when a test failed only with our adapters and is not listed in
the expected file's section SUITE (``openai-agents``, ``langgraph-prebuilt``), when a listed
test passed (the difference is gone: remove its line), was not run (renamed or removed
upstream) or fails without our adapters too, or when a tool built by our adapter shows the
model anything its framework's own tool does not.

The expected file: ``[section]`` lines, then one pytest node id a line followed by
``# reason``; an id ending in ``[*]`` stands for the parametrizations of the test that fail
(some make no identical call and pass; the entry must go when none fails). With
``$COMPAT_FLAG=side_effecting`` (the control run) every test must pass: the listed
differences come from sharing, and nothing is shared.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

EXPECTED = Path(os.environ.get("COMPAT_EXPECTED") or Path(__file__).with_name("expected.txt"))


def read_expected(path: Path, suite: str) -> dict[str, str]:
    """The entries of ``suite``'s section: node id (or ``id[*]``) -> reason."""
    entries: dict[str, str] = {}
    section = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        test, _, reason = line.partition("#")
        if not reason.strip():
            sys.exit(f"{path}:{number}: an entry without a reason (`<test id>  # why`)")
        if section == suite:
            entries[test.strip()] = reason.strip()
    return entries


def read_outcomes(path: Path) -> dict[str, str]:
    """node id -> passed, failed or skipped (a failed setup or teardown fails the test)."""
    if not path.exists():
        return {}
    rank = {"skipped": 0, "passed": 1, "failed": 2}
    outcomes: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        nodeid, outcome = json.loads(line)
        if rank[outcome] >= rank.get(outcomes.get(nodeid, ""), -1):
            outcomes[nodeid] = outcome
    return outcomes


def matches(entry: str, nodeid: str) -> bool:
    if entry.endswith("[*]"):
        return nodeid.startswith(entry[:-2]) or nodeid == entry[:-3]
    return nodeid == entry


def verdict(suite: str, outcomes: dict[str, str], expected: dict[str, str],
            unswapped: dict[str, str]) -> list[str]:
    problems = []
    for nodeid, outcome in sorted(outcomes.items()):
        if outcome == "failed" and unswapped.get(nodeid) != "failed" and not any(
                matches(e, nodeid) for e in expected):
            problems.append(f"unexpected failure: {nodeid}")
    for entry, reason in expected.items():
        run = {n: o for n, o in outcomes.items() if matches(entry, n)}
        if not run or all(o == "skipped" for o in run.values()):
            problems.append(f"listed but not run: {entry}  ({reason})")
        elif all(o != "failed" for o in run.values()):
            # For `[*]`, only when no parametrization fails: often some of them make no
            # identical call (a run without the resume, say), and those pass.
            problems.append(f"listed but passes now, remove it from compat/expected.txt "
                            f"[{suite}]: {entry}")
        for nodeid, outcome in sorted(run.items()):
            if outcome == "failed" and unswapped.get(nodeid) == "failed":
                problems.append(f"listed but fails without our adapters too: {nodeid}")
    return problems


def schemas(path: Path) -> tuple[collections.Counter[str], list[str]]:
    counts: collections.Counter[str] = collections.Counter()
    differences = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["difference"]:
                differences.append(f"{entry['kind']} tool {entry['name']}: {entry['difference']}")
            else:
                counts["identical" if entry["shared"] else "identical, unshared"] += 1
    return counts, differences


def main(argv: list[str]) -> int:
    if argv[:1] == ["failed"] and len(argv) == 2:
        for nodeid, outcome in sorted(read_outcomes(Path(argv[1])).items()):
            if outcome == "failed":
                print(nodeid)
        return 0
    if argv[:1] != ["verdict"] or len(argv) != 5:
        sys.exit(__doc__)
    suite, outcomes_path, schema_path, unswapped_path = argv[1:]
    expected = read_expected(EXPECTED, suite)
    if os.environ.get("COMPAT_FLAG") == "side_effecting":
        expected = {}  # the control run: nothing is shared, so no difference may remain
    outcomes = read_outcomes(Path(outcomes_path))
    unswapped = read_outcomes(Path(unswapped_path))
    problems = verdict(suite, outcomes, expected, unswapped)
    counts, differences = schemas(Path(schema_path))
    problems += [f"schema differs: {d}" for d in differences]
    tally = collections.Counter(outcomes.values())
    listed = sum(1 for n, o in outcomes.items()
                 if o == "failed" and any(matches(e, n) for e in expected))
    environment = sorted(n for n, o in outcomes.items() if o == "failed" and unswapped.get(n) == "failed")
    print(f"== {suite}: {tally['passed']} passed, {tally['failed']} failed ({listed} listed in "
          f"compat/expected.txt, {len(environment)} failing without our adapters too), "
          f"{tally['skipped']} skipped; tools built by our adapters: {sum(counts.values())}, "
          f"identical to the framework's: "
          f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'none'}; "
          f"differing: {len(differences)}")
    if environment:
        print(f"   failing without our adapters too (the environment's): {', '.join(environment)}")
    for problem in problems:
        print(f"compat: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

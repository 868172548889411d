"""Forces a platform's store code on Linux, in every process of a test run (the pytest
process and each worker it starts), when SINGLEFLIGHT_TEST_PLATFORM is set and this folder
is on PYTHONPATH:

- ``windows-lock``: ``fcntl`` cannot be imported; the liveness lock is ``msvcrt.locking``
  (tests/portable/fake_msvcrt.py), and lock files are never unlinked while open.
- ``no-lock``: ``fcntl`` cannot be imported and there is no ``msvcrt``: leases expire.

See docs/ci.md ("the forced-portable runs")."""

import os
import sys

_PLATFORM = os.environ.get("SINGLEFLIGHT_TEST_PLATFORM", "")
if _PLATFORM in ("windows-lock", "no-lock"):
    import fcntl as _fcntl

    sys.modules["fcntl"] = None  # type: ignore[assignment]  # `import fcntl` -> ImportError
    if _PLATFORM == "windows-lock":
        # The standard modules that take the presence of msvcrt to mean Windows are
        # imported first, so only our code finds the stand-in.
        import getpass  # noqa: F401
        import subprocess  # noqa: F401

        sys.path.insert(0, os.path.dirname(__file__))
        import fake_msvcrt

        sys.modules["msvcrt"] = fake_msvcrt.make(_fcntl)
elif _PLATFORM:
    raise SystemExit(f"SINGLEFLIGHT_TEST_PLATFORM={_PLATFORM!r}: use windows-lock or no-lock")

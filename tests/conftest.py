from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from singleflight_agents import Singleflight

pytest_plugins = ["pytester"]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "receipts.db"


@pytest.fixture
def sf(db_path: Path) -> Iterator[Singleflight]:
    engine = Singleflight(db_path)
    yield engine
    engine.close()

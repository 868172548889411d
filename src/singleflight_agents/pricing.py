"""Model prices: US dollars per million tokens, per model, as the user gives them.

A table is a mapping ``{"gpt-4.1": {"input": 2.00, "output": 8.00}}`` (or ``[2.00, 8.00]``),
or the path of a JSON file holding one. No prices ship with the library: they change, and a
report is only as true as the table it was given.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PRICES = "SINGLEFLIGHT_PRICES"

PriceSource = Mapping[str, Any] | str | os.PathLike[str] | None


class PriceTable:
    """Dollars per million input and output tokens, by model name."""

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self._prices = dict(prices or {})

    @classmethod
    def load(cls, source: PriceSource | PriceTable) -> PriceTable:
        """A table from a mapping, a JSON file's path, ``None`` ($SINGLEFLIGHT_PRICES or empty)
        or a table; bad entries raise ``ValueError`` naming the entry and the expected form."""
        if isinstance(source, PriceTable):
            return source
        if source is None:
            source = os.environ.get(ENV_PRICES) or None
            if source is None:
                return cls()
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            try:
                source = json.loads(_read_regular_file(path))
            except OSError as exc:
                raise ValueError(f"price table {str(path)!r} cannot be read ({exc.strerror}); "
                                 f"give a JSON file like {_EXAMPLE}") from None
            except ValueError as exc:
                raise ValueError(f"price table {str(path)!r} is not JSON ({exc}); write it "
                                 f"like {_EXAMPLE}") from None
        if not isinstance(source, Mapping):
            raise ValueError(f"a price table maps model names to prices, like {_EXAMPLE}")
        return cls({str(model): _entry(str(model), value) for model, value in source.items()})

    def dollars(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """What the tokens cost, or ``None`` when the table has no price for ``model``."""
        price = self._prices.get(model)
        if price is None:
            return None
        return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000

    def __bool__(self) -> bool:
        return bool(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({self._prices!r})"


_EXAMPLE = '{"gpt-4.1": {"input": 2.0, "output": 8.0}} (dollars per million tokens)'


def _entry(model: str, value: Any) -> tuple[float, float]:
    pair: Any = value
    if isinstance(value, Mapping):
        pair = None if set(value) != {"input", "output"} else (value["input"], value["output"])
    if (isinstance(pair, list | tuple) and len(pair) == 2
            and all(isinstance(p, int | float) and not isinstance(p, bool)
                    and math.isfinite(p) and p >= 0 for p in pair)):
        return float(pair[0]), float(pair[1])
    raise ValueError(f"price for model {model!r} is {value!r}; write it as "
                     f'{{"input": 2.0, "output": 8.0}} (dollars per million tokens, >= 0)')


def _read_regular_file(path: Path) -> str:
    """The file's text; a FIFO or device there is refused at once, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(0, "not a regular file")
        return handle.read().decode("utf-8")

"""Model prices: US dollars per million tokens, per model.

Two sources; the first that knows a model prices it:

1. your table: a mapping ``{"gpt-4.1": {"input": 2.00, "output": 8.00}}`` (or ``[2.00, 8.00]``),
   or the path of a JSON file holding one ($SINGLEFLIGHT_PRICES by default);
2. the `genai-prices <https://github.com/pydantic/genai-prices>`_ catalogue, when that package
   is installed (``pip install 'singleflight-agents[prices]'``): the prices bundled with the
   installed version. This module never asks it to fetch newer prices from the network (an
   application that starts ``genai_prices.UpdatePrices`` itself gets the fetched ones).

Set ``SINGLEFLIGHT_GENAI_PRICES=0`` (or ``false``, ``no``, ``off``) to price from your table
alone; it is read when a table is loaded. No prices ship with this library itself: they
change, and a report is only as true as its sources.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ._platform import O_BINARY, O_CLOEXEC, O_NONBLOCK

ENV_PRICES = "SINGLEFLIGHT_PRICES"
ENV_GENAI_PRICES = "SINGLEFLIGHT_GENAI_PRICES"
YOUR_TABLE = "your table"

_OFF = frozenset({"0", "false", "no", "off"})
_UNSET: Any = object()

PriceSource = Mapping[str, Any] | str | os.PathLike[str] | None


class PriceTable:
    """Dollars per million input and output tokens, by model name: from the given table,
    else from genai-prices when it is installed and not switched off (see the module)."""

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self._prices = dict(prices or {})
        self._catalog_on = os.environ.get(ENV_GENAI_PRICES, "").strip().lower() not in _OFF
        # Imported on first need, not here: an engine that never meets a model outside the
        # table never pays for importing the catalogue.
        self._catalog: ModuleType | None = _UNSET

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

    def dollars(self, model: str, tokens_in: int, tokens_out: int, *,
                provider: str | None = None) -> float | None:
        """What the tokens cost, or ``None`` when no source has a price for ``model``.
        ``provider`` ("openai", "anthropic", "google", ...) narrows genai-prices' match; a
        model it does not know under that provider is matched by its name alone."""
        price = self._prices.get(model)
        if price is not None:
            return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000
        catalog = self._genai_prices()
        if catalog is None:
            return None
        return _catalog_dollars(catalog, model, tokens_in, tokens_out, provider)

    def source(self, model: str, *, provider: str | None = None) -> str | None:
        """Which source prices ``model``: ``"your table"``, ``"genai-prices <version>"``, or
        ``None`` when neither does."""
        if model in self._prices:
            return YOUR_TABLE
        catalog = self._genai_prices()
        if catalog is None or _lookup(catalog, model, provider) is None:
            return None
        return _label(catalog)

    @property
    def catalog(self) -> str | None:
        """``"genai-prices <version>"`` when that catalogue prices what the table does not,
        else ``None`` (not installed, or switched off)."""
        catalog = self._genai_prices()
        return None if catalog is None else _label(catalog)

    def _genai_prices(self) -> ModuleType | None:
        if self._catalog is _UNSET:
            self._catalog = _import_genai_prices() if self._catalog_on else None
        return self._catalog

    def __bool__(self) -> bool:
        """Whether the table itself has prices (genai-prices aside: see :attr:`catalog`)."""
        return bool(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({self._prices!r})"


def _import_genai_prices() -> ModuleType | None:
    try:
        import genai_prices
    # Optional: absent, or broken by its own dependencies, the table alone prices.
    except Exception:
        return None
    return genai_prices


def _label(catalog: ModuleType) -> str:
    return f"genai-prices {getattr(catalog, '__version__', '')}".rstrip()


class _Match(NamedTuple):
    provider_id: str | None  # what genai-prices knows the model under: the hint, or by name


@functools.lru_cache(maxsize=1024)
def _lookup(catalog: ModuleType, model: str, provider: str | None) -> _Match | None:
    """How genai-prices finds ``model`` (cached: a miss scans every model it knows)."""
    for provider_id in dict.fromkeys((provider, None)):  # the hint, then the name alone
        try:
            catalog.calc_price(catalog.Usage(input_tokens=0, output_tokens=0), model,
                               provider_id=provider_id)
        # LookupError: an unknown model or provider; anything else from a third-party
        # catalogue must not fail a model turn either: unpriced, like an unknown model.
        except Exception:
            continue
        return _Match(provider_id)
    return None


def _catalog_dollars(catalog: ModuleType, model: str, tokens_in: int, tokens_out: int,
                     provider: str | None) -> float | None:
    match = _lookup(catalog, model, provider)
    if match is None:
        return None
    # Priced per call, never cached per million: prices can be tiered by prompt size.
    try:
        calculation = catalog.calc_price(
            catalog.Usage(input_tokens=tokens_in, output_tokens=tokens_out), model,
            provider_id=match.provider_id)
        return float(calculation.total_price)
    except Exception:
        return None


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
    fd = os.open(path, os.O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_BINARY)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(0, "not a regular file")
        return handle.read().decode("utf-8")

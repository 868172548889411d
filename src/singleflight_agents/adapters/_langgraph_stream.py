"""The custom stream events a shared tool or node writes (``get_stream_writer()``, a
runtime's ``stream_writer``, a node's ``writer``): recorded with its result by the run that
executes it, and written again, in order, by every caller served that result (a receipt
hit or an in-flight waiter), so a shared call looks to the graph like one that ran."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ._langgraph_compat import current_writer, is_runtime, runtime_with_writer, writer_swapped

__all__ = ["Recorder", "replay"]

Writer = Callable[[Any], None]


class Recorder:
    """Forwards each event as it is written and keeps it for the stored result."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def wrap(self, writer: Writer) -> Writer:
        def write(chunk: Any) -> None:
            self.events.append(chunk)
            writer(chunk)

        return write

    @contextmanager
    def recording(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Within the block, the run's writer records; yields ``kwargs`` with an injected
        runtime or ``writer`` recording too."""
        real = current_writer()
        with writer_swapped(self.wrap):
            yield {name: self._swapped(name, value, real) for name, value in kwargs.items()}

    def _swapped(self, name: str, value: Any, real: Writer | None) -> Any:
        if is_runtime(value) and callable(getattr(value, "stream_writer", None)):
            return runtime_with_writer(value, self.wrap(value.stream_writer))
        # A node's writer= is the run's writer (compared by equality: a bound method is a new
        # object each time it is read).
        if name == "writer" and real is not None and callable(value) and value == real:
            return self.wrap(value)
        return value


def replay(events: list[Any]) -> None:
    """Write ``events`` to the current run's stream, if there is a run."""
    writer = current_writer()
    if writer is not None:
        for event in events:
            writer(event)

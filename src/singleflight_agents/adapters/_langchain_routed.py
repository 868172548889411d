"""A copy of the model a receipt wrapper wraps, whose turns go through the wrapper.

LangChain dispatches some calls on the model's own class: a provider's
``with_structured_output`` and ``bind_tools`` build what they return (a binding of the model,
a parser chain, a function closing over it) from the model itself. The wrapper lets the
model's own method build it on this copy: whatever it returns runs the copy, and the copy's
generation methods are the wrapper's, so each turn is still keyed, recorded and replayed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from ._langchain_compat import swap_class

__all__ = ["routed_model"]


class _Wrapper(Protocol):
    """The generation methods of ``ReceiptChatModel``."""

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult: ...

    async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                         **kwargs: Any) -> ChatResult: ...

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]: ...

    def _astream(self, messages: Any, stop: Any = None, run_manager: Any = None,
                 **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]: ...

    def _should_stream(self, *, async_api: bool, run_manager: Any = None,
                       **kwargs: Any) -> bool: ...


def routed_model(wrapper: _Wrapper, inner: BaseChatModel) -> BaseChatModel:
    """``inner`` copied, of a subclass of its class whose generation runs ``wrapper``'s."""
    cls = type(inner)

    def _generate(self: BaseChatModel, messages: Any, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        return wrapper._generate(messages, stop, run_manager, **kwargs)

    async def _agenerate(self: BaseChatModel, messages: Any, stop: Any = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        return await wrapper._agenerate(messages, stop, run_manager, **kwargs)

    def _stream(self: BaseChatModel, messages: Any, stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from wrapper._stream(messages, stop, run_manager, **kwargs)

    async def _astream(self: BaseChatModel, messages: Any, stop: Any = None,
                       run_manager: Any = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in wrapper._astream(messages, stop, run_manager, **kwargs):
            yield chunk

    def _should_stream(self: BaseChatModel, *, async_api: bool, run_manager: Any = None,
                       **kwargs: Any) -> bool:
        return wrapper._should_stream(async_api=async_api, run_manager=run_manager, **kwargs)

    def _should_use_protocol_streaming(self: BaseChatModel, *, async_api: bool,
                                       run_manager: Any = None, **kwargs: Any) -> bool:
        return False

    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "__doc__": cls.__doc__, "_generate": _generate, "_agenerate": _agenerate,
                 "_stream": _stream, "_astream": _astream, "_should_stream": _should_stream,
                 "_should_use_protocol_streaming": _should_use_protocol_streaming}
    # The wrapper waits for the rate limiter on a miss only: the copy must not wait as well.
    routed = inner.model_copy(update={"rate_limiter": None})
    swap_class(routed, type(cls.__name__, (cls,), namespace))
    return routed

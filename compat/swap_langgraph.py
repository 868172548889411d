"""pytest plugin: langgraph-prebuilt's own test suite with our adapters swapped in.

Loaded with ``-p compat._swap -p compat.swap_langgraph`` (before the suite's modules are
imported), it makes

- every ``ToolNode`` (built by a test or by ``create_react_agent``) run tools wrapped by
  :func:`singleflight_agents.adapters.wrap_langchain_tool` (``$COMPAT_FLAG``, by default
  ``deterministic=True``; a tool that reads the store, which the adapter refuses to share
  without ``key=``, unshared), and logs whether what the model sees of each tool (its OpenAI tool
  schema, name, description, ``return_direct``, ``response_format``) equals the original's;
- every chat model given to ``create_react_agent`` a
  :func:`singleflight_agents.adapters.receipt_chat_model`.

``$COMPAT_SWAP`` (default ``tools,models``) selects the swaps, to tell which one a failure
comes from.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import langgraph.prebuilt
import langgraph.prebuilt.chat_agent_executor as chat_agent_executor
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool
from langchain_core.tools import tool as create_tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.prebuilt.tool_node import ToolNode

from compat._swap import ENGINE, OPTIONS, first_difference, log_schema, unique_name
from singleflight_agents.adapters import receipt_chat_model, wrap_langchain_tool

SWAPS = set(os.environ.get("COMPAT_SWAP", "tools,models").split(","))
SDK_TOOL_NODE_INIT = ToolNode.__init__
SDK_CREATE_REACT_AGENT = chat_agent_executor.create_react_agent


def _seen(tool: BaseTool) -> dict[str, Any]:
    return {"openai": convert_to_openai_tool(tool), "name": tool.name,
            "description": tool.description, "return_direct": tool.return_direct,
            "response_format": tool.response_format}


def _ours(tool: Any) -> Any:
    """``tool`` (a ``BaseTool`` or a function, as ``ToolNode`` takes them) made by our
    adapter; anything else as it is, for ``ToolNode`` to refuse as it would."""
    if getattr(type(tool), "__singleflight__", False) or not (
            isinstance(tool, BaseTool) or callable(tool)):
        return tool
    theirs = tool if isinstance(tool, BaseTool) else create_tool(tool)
    # A tool is named by the function it runs, as the adapter's own rule does, but one name
    # per function object: a factory's tools capture different values.
    runs = getattr(theirs, "func", None) or getattr(theirs, "coroutine", None) or theirs
    name, shared = unique_name("langchain", runs), True
    try:
        ours = wrap_langchain_tool(ENGINE, tool, tool_name=name, **OPTIONS)
    except TypeError as exc:
        if "cannot be keyed" not in str(exc):
            raise
        # A shared tool that reads the store is refused without key= (the store's contents
        # are no argument). An application gives it key= or leaves it unshared; a key written
        # here would only guess what the test's tool reads, so it is wrapped unshared.
        ours = wrap_langchain_tool(ENGINE, tool, tool_name=name, side_effecting=True)
        shared = False
    log_schema("langgraph", theirs.name, first_difference(_seen(ours), _seen(theirs)),
               shared=shared)
    return ours


@functools.wraps(SDK_TOOL_NODE_INIT)
def _tool_node_init(self: ToolNode, tools: Any, *args: Any, **kwargs: Any) -> None:
    SDK_TOOL_NODE_INIT(self, [_ours(tool) for tool in tools], *args, **kwargs)


@functools.wraps(SDK_CREATE_REACT_AGENT)
def create_react_agent(model: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(model, BaseChatModel):
        model = receipt_chat_model(ENGINE, model, model_name=unique_name("model", model),
                                   **OPTIONS)
    return SDK_CREATE_REACT_AGENT(model, *args, **kwargs)


if "tools" in SWAPS:
    ToolNode.__init__ = _tool_node_init  # type: ignore[method-assign]
if "models" in SWAPS:
    langgraph.prebuilt.create_react_agent = create_react_agent
    chat_agent_executor.create_react_agent = create_react_agent

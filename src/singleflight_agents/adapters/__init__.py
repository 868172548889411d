"""Adapters for agent frameworks. Each imports its framework only when used.

- OpenAI Agents SDK (extra ``[openai]``): :func:`function_tool`, :func:`wrap_function_tool`;
  model turns: :func:`receipt_model`, :func:`receipt_model_provider`.
- LangGraph / LangChain (extra ``[langgraph]``): :func:`wrap_langgraph_node`,
  :func:`wrap_langchain_tool`, :func:`wrap_langchain_tools`; model turns:
  :func:`receipt_chat_model`.
- PydanticAI (extra ``[pydantic-ai]``): :func:`pydantic_ai_tool`, :func:`wrap_pydantic_ai_toolset`.
- MCP servers (``mcp``): :func:`receipt_mcp_client` (a ``ClientSession``, ``mcp.Client``, stdio
  command or URL); :func:`receipt_mcp_server` (an Agents SDK ``MCPServer``, extra ``[openai]``).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .langchain_models import receipt_chat_model as receipt_chat_model
    from .langgraph import wrap_langchain_tool as wrap_langchain_tool
    from .langgraph import wrap_langchain_tools as wrap_langchain_tools
    from .langgraph import wrap_langgraph_node as wrap_langgraph_node
    from .mcp import ReceiptMCPClient as ReceiptMCPClient
    from .mcp import receipt_mcp_client as receipt_mcp_client
    from .mcp_agents import ReceiptMCPServer as ReceiptMCPServer
    from .mcp_agents import receipt_mcp_server as receipt_mcp_server
    from .openai_agents import function_tool as function_tool
    from .openai_agents import wrap_function_tool as wrap_function_tool
    from .openai_models import receipt_model as receipt_model
    from .openai_models import receipt_model_provider as receipt_model_provider
    from .pydantic_ai import pydantic_ai_tool as pydantic_ai_tool
    from .pydantic_ai import wrap_pydantic_ai_toolset as wrap_pydantic_ai_toolset

_HOMES = {
    "function_tool": (".openai_agents", "openai"),
    "wrap_function_tool": (".openai_agents", "openai"),
    "wrap_langgraph_node": (".langgraph", "langgraph"),
    "wrap_langchain_tool": (".langgraph", "langgraph"),
    "wrap_langchain_tools": (".langgraph", "langgraph"),
    "receipt_model": (".openai_models", "openai"),
    "receipt_model_provider": (".openai_models", "openai"),
    "receipt_chat_model": (".langchain_models", "langgraph"),
    "pydantic_ai_tool": (".pydantic_ai", "pydantic-ai"),
    "wrap_pydantic_ai_toolset": (".pydantic_ai", "pydantic-ai"),
    "receipt_mcp_client": (".mcp", "mcp"),
    "ReceiptMCPClient": (".mcp", "mcp"),
    "receipt_mcp_server": (".mcp_agents", "mcp,openai"),
    "ReceiptMCPServer": (".mcp_agents", "mcp,openai"),
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home, extra = _HOMES[name]
    try:
        module = importlib.import_module(home, __name__)
    except ImportError as exc:
        raise ImportError(f"singleflight_agents.adapters.{name} needs its framework "
                          f"({exc.name}): pip install 'singleflight-agents[{extra}]'") from exc
    value = getattr(module, name)
    globals()[name] = value
    return value

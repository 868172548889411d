"""Every place the adapters reach into the OpenAI Agents SDK beyond its public API (checked
against openai-agents 0.24): when an SDK release moves one, this module is what changes.

- The attributes by which the SDK marks a function tool's invoker: whether it binds its
  failure handling to the tool, the arguments hook approval policies read, whether the tool
  is a sync function, and the callable ``tool.__wrapped__`` gives back.
- A hosted or MCP tool's namespace, which ``get_response`` sends to the model.
- The hook the runner calls on a model when a run ends.
- An MCP server's approval policy and failure handling, and the name the SDK logs it under.
"""

from __future__ import annotations

import contextlib
from typing import Any

from agents.mcp._logging import get_mcp_server_log_name as mcp_server_log_name
from agents.tool import set_function_tool_failure_error_function, with_function_tool_failure_error_handler

__all__ = ["copy_invoker_marks", "handles_failures", "mcp_server_log_name", "mcp_server_policies",
           "raise_failures", "run_end_cleanup", "set_mcp_server_policies", "tool_namespace",
           "with_failure_handler"]

_BINDS_TO_TOOL = "__agents_bind_function_tool__"
_PREPARES_ARGUMENTS = "__agents_prepare_arguments__"
_SYNC_TOOL = "__agents_sync_function_tool__"
_WRAPPED_CALLABLE = "__agents_function_tool_wrapped_callable__"


def handles_failures(invoker: Any) -> bool:
    """Whether the SDK's own failure handling is bound into ``invoker`` (``function_tool``)."""
    return callable(getattr(invoker, _BINDS_TO_TOOL, None))


def raise_failures(tool: Any) -> None:
    """Make ``tool``'s invoker raise instead of answering the model with an error message."""
    set_function_tool_failure_error_function(tool, None)


def copy_invoker_marks(original: Any, invoke: Any, tool: Any) -> None:
    """Give ``invoke`` what the SDK reads from ``original``: its arguments hook, and the
    callable ``tool.__wrapped__`` returns."""
    prepare = getattr(original, "prepare_arguments", None)
    if prepare is not None:  # approval policies inspect the validated arguments
        setattr(invoke, _PREPARES_ARGUMENTS, prepare)
    with contextlib.suppress(AttributeError):  # a tool without a Python function of its own
        setattr(invoke, _WRAPPED_CALLABLE, tool.__wrapped__)


def with_failure_handler(original: Any, invoke: Any, on_failure: Any) -> Any:
    """``invoke`` with the SDK's failure handling around it, marked sync as ``original`` is."""
    invoker = with_function_tool_failure_error_handler(invoke, on_failure)
    if getattr(original, _SYNC_TOOL, False):
        setattr(invoker, _SYNC_TOOL, True)
    return invoker


def tool_namespace(tool: Any) -> dict[str, Any]:
    return {"namespace": getattr(tool, "_tool_namespace", None),
            "namespace_description": getattr(tool, "_tool_namespace_description", None)}


async def run_end_cleanup(model: Any, owner: object) -> None:
    """What the runner asks of a model when a run ends."""
    await model._cleanup_on_run_end(owner)


def mcp_server_policies(server: Any) -> tuple[Any, Any]:
    """An MCP server's approval policy and failure error function."""
    return server._needs_approval_policy, server._failure_error_function


def set_mcp_server_policies(server: Any, policies: tuple[Any, Any]) -> None:
    server._needs_approval_policy, server._failure_error_function = policies

"""Every place the adapters reach into the OpenAI Agents SDK beyond its public API (checked
against openai-agents 0.24): when an SDK release moves one, this module is what changes.

- The attributes by which the SDK marks a function tool's invoker: whether it binds its
  failure handling to the tool, the arguments hook approval policies read, whether the tool
  is a sync function, and the callable ``tool.__wrapped__`` gives back.
- A function tool's failure reporter (the span error and the log lines under the SDK's
  tool-data setting), reused around an invoker of ours; the "not given" default of
  ``failure_error_function``.
- A hosted or MCP tool's namespace, which ``get_response`` sends to the model.
- The hook the runner calls on a model when a run ends, and the mark by which a model's task
  knows that the SDK's model timeout cancelled it.
- An MCP server's approval policy and failure handling, and the name the SDK logs it under.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agents.mcp._logging import get_mcp_server_log_name as mcp_server_log_name
from agents.tool import _UNSET_FAILURE_ERROR_FUNCTION as UNSET_FAILURE_ERROR_FUNCTION
from agents.tool import _with_context_function_tool_failure_error_handler as with_failure_reporter
from agents.tool import set_function_tool_failure_error_function

__all__ = ["UNSET_FAILURE_ERROR_FUNCTION", "carry_model_timeout", "copy_invoker_marks", "expose_wrapped",
           "handles_failures", "mcp_server_log_name", "mcp_server_policies", "raise_failures",
           "run_end_cleanup", "set_mcp_server_policies", "tool_namespace", "with_failure_handler"]

_BINDS_TO_TOOL = "__agents_bind_function_tool__"
_PREPARES_ARGUMENTS = "__agents_prepare_arguments__"
_SYNC_TOOL = "__agents_sync_function_tool__"
_WRAPPED_CALLABLE = "__agents_function_tool_wrapped_callable__"
_MODEL_TIMEOUT = "_openai_agents_model_timeout_error"


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


def expose_wrapped(tool: Any, func: Any) -> None:
    """Make ``tool.__wrapped__`` give back ``func``: the SDK reads it from the implementation
    inside the tool's invoker (a closure made for this tool alone)."""
    setattr(tool.on_invoke_tool._invoke_tool_impl, _WRAPPED_CALLABLE, func)


def with_failure_handler(original: Any, invoke: Any) -> Any:
    """``invoke`` inside the failure handling ``original`` has: the tool's error message for
    the model, and the SDK's own report of the failure (the function span's error; the log
    lines, exception detail included when the SDK's tool-data setting allows it). Marked sync
    as ``original`` is."""
    invoker = with_failure_reporter(invoke, original._on_handled_error)
    if getattr(original, _SYNC_TOOL, False):
        setattr(invoker, _SYNC_TOOL, True)
    return invoker


def tool_namespace(tool: Any) -> dict[str, Any]:
    return {"namespace": getattr(tool, "_tool_namespace", None),
            "namespace_description": getattr(tool, "_tool_namespace_description", None)}


def carry_model_timeout(source: asyncio.Task[Any] | None, target: asyncio.Future[Any]) -> None:
    """Mark ``target`` as cancelled by the SDK's model timeout if ``source`` is: a model's
    stream running in ``target`` then records the timeout on its span as in ``source``."""
    error = getattr(source, _MODEL_TIMEOUT, None)
    if error is not None:
        setattr(target, _MODEL_TIMEOUT, error)


async def run_end_cleanup(model: Any, owner: object) -> None:
    """What the runner asks of a model when a run ends."""
    await model._cleanup_on_run_end(owner)


def mcp_server_policies(server: Any) -> tuple[Any, Any]:
    """An MCP server's approval policy and failure error function."""
    return server._needs_approval_policy, server._failure_error_function


def set_mcp_server_policies(server: Any, policies: tuple[Any, Any]) -> None:
    server._needs_approval_policy, server._failure_error_function = policies

"""pytest plugin: the OpenAI Agents SDK's own test suite with our adapters swapped in.

Loaded with ``-p compat._swap -p compat.swap_agents`` (before the suite's conftest and test modules are
imported), it replaces

- ``agents.function_tool`` (and ``agents.tool.function_tool``) by a function that builds each
  tool with :func:`singleflight_agents.adapters.function_tool` (``$COMPAT_FLAG``, by default
  ``deterministic=True``), and logs whether the tool's name, description, parameter schema and
  strictness equal those of the SDK's own tool built from the same function and keywords;
- the runner's model lookup (``get_model``), so that every model a run uses, the scripted test
  models included, is wrapped by :func:`singleflight_agents.adapters.receipt_model`.

``$COMPAT_SWAP`` (default ``tools,models``) selects the swaps, to tell which one a failure
comes from.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from typing import Any

import agents
import agents.run  # the run loop, whose get_model is swapped below
import agents.tool
from agents import Model
from agents.run_internal import turn_preparation

from compat._swap import ENGINE, OPTIONS, first_difference, log_schema, unique_name
from singleflight_agents.adapters import function_tool as our_function_tool
from singleflight_agents.adapters import receipt_model

SWAPS = set(os.environ.get("COMPAT_SWAP", "tools,models").split(","))
SDK_FUNCTION_TOOL = agents.tool.function_tool
SDK_GET_MODEL = turn_preparation.get_model
# What the model sees of a function tool.
SEEN = ("name", "description", "params_json_schema", "strict_json_schema", "defer_loading")


@functools.wraps(SDK_FUNCTION_TOOL)  # its signature too: tests inspect it
def function_tool(func: Any = None, /, **kwargs: Any) -> Any:
    """``agents.function_tool``, with the tool built by our adapter."""
    if func is None:
        return lambda f: function_tool(f, **kwargs)
    name = unique_name("agents", func)
    ours = our_function_tool(ENGINE, func, tool_name=name, **OPTIONS, **kwargs)
    theirs = SDK_FUNCTION_TOOL(func, **kwargs)
    log_schema("agents", ours.name, first_difference(
        {k: getattr(ours, k, None) for k in SEEN}, {k: getattr(theirs, k, None) for k in SEEN}))
    return ours


_models: weakref.WeakKeyDictionary[Model, Model] = weakref.WeakKeyDictionary()


def get_model(agent: Any, run_config: Any) -> Model:
    """The model the SDK resolves for a run, wrapped by ``receipt_model`` (once per model
    object, so that a model keeps one name and its receipts for the whole test)."""
    model = SDK_GET_MODEL(agent, run_config)
    wrapped = _models.get(model)
    if wrapped is None:
        wrapped = _models[model] = receipt_model(
            ENGINE, model, model_name=unique_name("model", model), **OPTIONS)
    return wrapped


def _swap_everywhere(original: Any, replacement: Any, prefix: str) -> None:
    """Replace ``original`` in every imported module under ``prefix`` that bound it by name."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(prefix):
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, replacement)


if "tools" in SWAPS:
    # The public names only, which the tests import: a tool the SDK builds for itself
    # (Agent.as_tool, a handoff) stays the SDK's, as it does in an application.
    agents.function_tool = agents.tool.function_tool = function_tool
if "models" in SWAPS:
    _swap_everywhere(SDK_GET_MODEL, get_model, "agents")

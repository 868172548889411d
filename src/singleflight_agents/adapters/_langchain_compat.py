"""Every place the adapters reach into LangChain beyond its public API (checked against
langchain-core 1.8): when a release moves one, this module is what changes.

- A chat model's identity as LangChain itself tells models apart (``_llm_type``,
  ``_identifying_params``, the LangSmith parameters) and its generation methods, which the
  wrapper calls on the model it wraps.
- A tool's run methods, and the class of a copied tool (or chat model) swapped for a subclass
  that routes them through the engine (pydantic models refuse a plain attribute for a method).
"""

from __future__ import annotations

from typing import Any

from langchain_core.tools import BaseTool
from pydantic import BaseModel

__all__ = ["agenerate", "generate", "identifying_params", "llm_type", "ls_params",
           "overrides_arun", "run_methods", "swap_class"]


def llm_type(model: Any) -> str:
    return str(model._llm_type)


def identifying_params(model: Any) -> Any:
    return model._identifying_params


def ls_params(model: Any, stop: list[str] | None, **kwargs: Any) -> Any:
    return model._get_ls_params(stop=stop, **kwargs)


def generate(model: Any, messages: Any, stop: list[str] | None, **kwargs: Any) -> Any:
    return model._generate(messages, stop=stop, **kwargs)


async def agenerate(model: Any, messages: Any, stop: list[str] | None, **kwargs: Any) -> Any:
    return await model._agenerate(messages, stop=stop, **kwargs)


def run_methods(cls: type[BaseTool]) -> tuple[Any, Any]:
    """A tool class's own sync and async run methods."""
    return cls._run, cls._arun


def overrides_arun(arun: Any) -> bool:
    """Whether a tool class has an async run of its own (else BaseTool runs the sync one in a
    thread)."""
    return arun is not BaseTool._arun


def swap_class(copy: BaseModel, cls: type[BaseModel]) -> None:
    object.__setattr__(copy, "__class__", cls)

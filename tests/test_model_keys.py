"""What keys a model turn, beyond the basics of test_model_openai.py and test_model_langchain.py:
requests the model answers differently get different keys (server-side conversations, computer
tool screens, media bytes, model fields ``_identifying_params`` leaves out), requests it answers
alike share one (JSON numbers, settings holding an object that cannot be encoded), and
credentials are keyed as secrets, never stored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from _fake_models import (
    KEY_ENV,
    KW,
    NAME,
    BanWords,
    Chat,
    Echo,
    LiteLLMLike,
    Local,
    OpenAILike,
    collect,
    direct_args,
    receipts,
    text_of,
)
from agents import ComputerTool
from agents.computer import Computer
from agents.testing import ScriptedModel, assistant_message
from conftest import SECRET
from langchain_core.messages import BaseMessage, HumanMessage

from singleflight_agents import Singleflight, SingleflightError
from singleflight_agents.adapters import receipt_chat_model
from singleflight_agents.adapters._turns import turn_identity
from singleflight_agents.adapters.openai_models import receipt_model
from singleflight_agents.codec import canonical_json

# == the Agents SDK ================================================================================

# -- conversation_id turns: the server holds the conversation, so the request does not ---------------


async def test_a_turn_in_a_server_side_conversation_is_not_replayed_after_the_conversation_grew(
        sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message(t)] for t in ("first answer", "other", "second answer")])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    in_conversation = {**KW, "conversation_id": "conv_1"}
    with pytest.warns(RuntimeWarning, match="conversation_id .* not shared or recorded; give key="):
        texts = [text_of(await model.get_response(*direct_args(input=text), **in_conversation))
                 for text in ("What next?", "Tell me more.", "What next?")]
    # The third turn sees a conversation of four items; the model must be asked again.
    assert len(inner.calls) == 3, texts
    assert sqlite_sf.summary()["tools"][f"model:{NAME}"]["unshared"] == 3


async def test_replay_mode_never_calls_the_model_for_a_conversation_turn(db_path: Path) -> None:
    inner = ScriptedModel([[assistant_message("a live answer")]])
    with Singleflight(db_path, mode="replay") as replayer:
        model = receipt_model(replayer, inner, model_name=NAME, deterministic=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(SingleflightError, match="conversation_id cannot be replayed"):
                await model.get_response(*direct_args(), **{**KW, "conversation_id": "conv_1"})
    assert len(inner.calls) == 0


async def test_a_side_effecting_model_is_not_told_to_give_key_for_conversation_turns(
        sqlite_sf: Singleflight) -> None:
    model = receipt_model(sqlite_sf, ScriptedModel([[assistant_message("x")]]), model_name=NAME,
                          side_effecting=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await model.get_response(*direct_args(), **{**KW, "conversation_id": "conv_1"})
    assert [str(w.message) for w in caught if "conversation_id" in str(w.message)] == []


# -- tools and streams ------------------------------------------------------------------------------


class Screen(Computer):
    """A browser screen of a given size (what the preview computer tool tells the model)."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)

    @property
    def environment(self) -> Any:
        return "browser"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.size

    def screenshot(self) -> str:
        return ""

    def click(self, x: int, y: int, button: Any) -> None: ...
    def double_click(self, x: int, y: int) -> None: ...
    def scroll(self, x: int, y: int, scroll_x: int, scroll_y: int) -> None: ...
    def type(self, text: str) -> None: ...
    def wait(self) -> None: ...
    def move(self, x: int, y: int) -> None: ...
    def keypress(self, keys: list[str]) -> None: ...
    def drag(self, path: list[tuple[int, int]]) -> None: ...


async def test_preview_computer_tools_with_different_screens_are_different_requests(
        sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message("click 500,300")], [assistant_message("click 900,500")]])
    model = receipt_model(sqlite_sf, inner, model_name="computer-use-preview", deterministic=True)
    for width, height in ((1024, 768), (1920, 1080)):
        await model.get_response(*direct_args(input="Click OK.",
                                               tools=[ComputerTool(Screen(width, height))]), **KW)
    assert len(inner.calls) == 2


async def test_a_user_key_cannot_make_a_stream_share_a_plain_turns_receipt(sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message("plain")], [assistant_message("streamed")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True,
                          key=lambda request: request["input"])
    await model.get_response(*direct_args(), **KW)
    events = await collect(model.stream_response(*direct_args(), **KW))
    assert events[-1].type == "response.completed"


# == both adapters: JSON numbers ====================================================================


def test_keys_normalise_json_numbers_only() -> None:
    def keyed(request: Any, stream: bool = False, user: Any = None) -> str:
        return canonical_json(turn_identity(request, stream, user))

    assert keyed({"t": 1.0}) == keyed({"t": 1})
    assert keyed({"t": True}) != keyed({"t": 1})
    assert keyed({"t": "1"}) != keyed({"t": 1})
    assert keyed({"t": 1.5}) != keyed({"t": 1})
    assert keyed({"t": [1.0, (2.0, {"x": -0.0})]}) == keyed({"t": [1, [2, {"x": 0}]]})
    assert keyed({"t": 1}) != keyed({"t": 1}, stream=True)
    assert keyed({"a": "x"}, user=lambda r: (r["a"], 1.0)) == canonical_json({"request": ["x", 1]})


def test_call_parameters_equal_as_json_numbers_share_a_turn(sf: Singleflight, chat_calls: list[Any]) -> None:
    chat = receipt_chat_model(sf, Chat(), deterministic=True)
    chat.invoke("hi", temperature=1)
    chat.invoke("hi", temperature=1.0)
    assert len(chat_calls) == 1


# == LangChain: messages and model fields ==========================================================


def test_message_blocks_with_different_bytes_are_different_requests(
        sf: Singleflight, chat_calls: list[Any]) -> None:
    chat = receipt_chat_model(sf, Chat(), deterministic=True)

    def image(data: bytes) -> list[BaseMessage]:
        return [HumanMessage(content=[{"type": "media", "mime_type": "image/png", "data": data}])]

    first = chat.invoke(image(b"\x89PNG cat"))
    second = chat.invoke(image(b"\x89PNG dog"))
    assert len(chat_calls) == 2
    assert first.content != second.content


def test_model_fields_missing_from_identifying_params_are_still_keyed(sf: Singleflight) -> None:
    plain = receipt_chat_model(sf, Chat(), deterministic=True).invoke("hi")
    stopped = receipt_chat_model(sf, Chat(stop_sequences=["\n"]), deterministic=True).invoke("hi")
    assert plain.content == "line one: hi\nline two"
    assert stopped.content == "line one: hi"


def test_settings_holding_one_unencodable_object_still_key_their_other_values(sf: Singleflight) -> None:
    greedy = receipt_chat_model(sf, Local(generation={"top_k": 1, "processor": BanWords()}),
                                deterministic=True)
    wide = receipt_chat_model(sf, Local(generation={"top_k": 40, "processor": BanWords()}),
                              deterministic=True)
    assert greedy.invoke("hi").content == "top_k=1"
    assert wide.invoke("hi").content == "top_k=40"


# == LangChain: credentials ========================================================================


def test_turns_recorded_with_an_api_key_replay_without_one(
        sf: Singleflight, store_url: str, monkeypatch: pytest.MonkeyPatch, chat_calls: list[Any]) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-recording-key")
    recorded = receipt_chat_model(sf, OpenAILike(), deterministic=True).invoke("hi")
    monkeypatch.delenv(KEY_ENV)  # CI: no key, receipts only
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as replayer:
        replayed = receipt_chat_model(replayer, OpenAILike(), deterministic=True).invoke("hi")
    assert replayed.content == recorded.content and len(chat_calls) == 1


@pytest.mark.parametrize("llm", [
    OpenAILike(api_key="sk-x", default_headers={"Authorization": "Bearer sk-gateway-0123456789abcdef"}),
    LiteLLMLike(openai_api_key="sk-gateway-0123456789abcdef"),
], ids=["default_headers", "str_api_key"])
def test_a_credential_in_a_model_field_never_reaches_the_store(sf: Singleflight, llm: Echo) -> None:
    receipt_chat_model(sf, llm, deterministic=True).invoke("hi")
    assert [r.tool_name for r in receipts(sf) if "sk-gateway-0123456789abcdef" in (r.inputs or "")] == []


def test_a_chat_openai_like_model_keys_its_api_key_as_a_secret_and_its_client_not_at_all(
        sf: Singleflight, chat_calls: list[Any]) -> None:
    first = OpenAILike(api_key="sk-first-0123456789", client=object(), timeout=30.0)
    rotated = OpenAILike(api_key="sk-rotated-9876543210", client=object(), timeout=30.0)
    assert receipt_chat_model(sf, first, deterministic=True).invoke("hi").content == "answer 1"
    assert receipt_chat_model(sf, rotated, deterministic=True).invoke("hi").content == "answer 1"
    stored = "".join(r.inputs or "" for r in receipts(sf))
    assert "sk-first" not in stored and "<secret>" in stored and '"client"' not in stored

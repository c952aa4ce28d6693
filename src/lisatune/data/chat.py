"""Conversations, loss on every assistant turn and nothing else (rendered with the tokenizer's chat template).

chat:     {"messages": [{"role": system | user | assistant, "content"}, ...]}
sharegpt: {"conversations": [{"from": human | user | gpt | assistant | model | system, "value"}, ...]}
Both may have several turns and a system message; `data.system_prompt` is the system message of every
conversation that brings none of its own.
"""
from __future__ import annotations

from typing import Any

from ..errors import LisaError
from .render import encode_chat

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}


def check_messages(loc: str, rec: dict) -> list[dict]:
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LisaError(f"{loc}: record has no 'messages' list (or it is empty)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LisaError(f"{loc}: message {i} is not a JSON object")
        if m.get("role") not in ROLES:
            raise LisaError(f"{loc}: message {i} has role {m.get('role')!r} (expected system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise LisaError(f"{loc}: message {i} has no 'content' string")
    if messages[-1]["role"] != "assistant":
        # Trailing non-assistant turns would carry no loss; most likely the file is cut or mislabelled.
        raise LisaError(f"{loc}: the last message has role {messages[-1]['role']!r} (expected assistant)")
    # Only role and content reach the template: extra keys would change what some templates render.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sharegpt_messages(loc: str, rec: dict) -> list[dict]:
    """ShareGPT turns as chat messages, up to the last assistant turn (human turns after it carry no loss:
    ShareGPT dumps often end on an unanswered question)."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise LisaError(f"{loc}: record has no 'conversations' list (or it is empty)")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise LisaError(f"{loc}: turn {i} is not a JSON object")
        who = t.get("from")
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise LisaError(f"{loc}: turn {i} is from {who!r} (expected {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(t.get("value"), str):
            raise LisaError(f"{loc}: turn {i} has no 'value' string")
        messages.append({"role": SHAREGPT_ROLES[who], "content": t["value"]})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LisaError(f"{loc}: the conversation has no assistant turn (from gpt, assistant or model)")
    return messages[: last + 1]


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def need_template(tokenizer, fmt: str) -> None:
    if not tokenizer.chat_template:
        raise LisaError(f"format '{fmt}' needs a tokenizer with a chat template (this one has none); "
                        "use format 'alpaca' for a base model")


def load_chat(records: list[tuple[str, Any]], tokenizer, system_prompt: str | None = None) -> list[dict]:
    need_template(tokenizer, "chat")
    return [encode_chat(tokenizer, with_system(check_messages(loc, rec), system_prompt), loc) for loc, rec in records]


def load_sharegpt(records: list[tuple[str, Any]], tokenizer, system_prompt: str | None = None) -> list[dict]:
    need_template(tokenizer, "sharegpt")
    return [encode_chat(tokenizer, with_system(sharegpt_messages(loc, rec), system_prompt), loc)
            for loc, rec in records]

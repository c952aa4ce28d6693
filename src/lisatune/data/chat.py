"""Chat records: {"messages": [{"role", "content"}, ...]}, one per JSONL line; loss on assistant turns."""
from __future__ import annotations

from ..errors import LisaError
from .records import read_records
from .render import encode_chat

ROLES = ("system", "user", "assistant")


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


def load_chat(path: str, tokenizer, option: str = "data.path") -> list[dict]:
    if not tokenizer.chat_template:
        raise LisaError("format 'chat' needs a tokenizer with a chat template (this one has none); "
                        "use format 'alpaca' for a base model")
    return [encode_chat(tokenizer, check_messages(loc, rec), loc) for loc, rec in read_records(path, option)]

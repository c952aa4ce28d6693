"""The registry of data formats: each one's record fields, the field that identifies it, and its loader.

A new format is a loader module plus one entry here (and its place in INFER when it can be recognised from a
record); the config's choices, the field checks, the inference and the dispatch all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .alpaca import load_alpaca
from .chat import ChatOptions, load_chat, load_sharegpt
from .text import documents, load_text


@dataclass(frozen=True)
class Format:
    fields: dict[str, bool]  # the record's fields (True: required); data.columns may map them to other columns
    marker: str | None = None  # the field that identifies the format when data.format is not set
    # (records [(location, record)], tokenizer, data config, source) -> examples; None: the format makes its own
    load: Callable[[list[tuple[str, Any]], Any, Any, str], list[dict]] | None = None


def chat_options(cfg) -> ChatOptions:
    return ChatOptions(cfg.system_prompt, cfg.loss_on, dict(cfg.roles), dict(cfg.message_keys))


FORMATS: dict[str, Format] = {
    "alpaca": Format({"instruction": True, "input": False, "output": True}, "instruction",
                     lambda records, tok, cfg, source: load_alpaca(records, tok)),
    "chat": Format({"messages": True}, "messages",
                   lambda records, tok, cfg, source: load_chat(records, tok, chat_options(cfg), source)),
    "sharegpt": Format({"conversations": True}, "conversations",
                       lambda records, tok, cfg, source: load_sharegpt(records, tok, chat_options(cfg), source)),
    "text": Format({"text": True}, "text",
                   lambda records, tok, cfg, source: load_text(documents(records), tok, cfg.max_length, source)),
    "gsm": Format({}),  # generated from the GSM-symbolic templates (data/gsm.py), not read from a file
}

# Inference tries the most specific marker first (a chat record may carry a `text` field too).
INFER = ("sharegpt", "chat", "alpaca", "text")

"""Conversations, loss on every assistant turn and nothing else (rendered with the tokenizer's chat template).

chat:     {"messages": [{"role": system | user | assistant, "content"}, ...]}
sharegpt: {"conversations": [{"from": human | user | gpt | assistant | model | system, "value"}, ...]}
Both may have several turns and a system message; `data.system_prompt` is the system message of every
conversation that brings none of its own. `data.loss_on` picks the tokens that carry loss (every assistant turn,
the last one, or all); `data.chat_template` replaces the model's template (a file or the template itself).
"""
from __future__ import annotations

from typing import Any

from ..errors import LisaError, first_line
from ..schema import read_text
from .render import encode_chat_counted

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


def is_template_text(value: str) -> bool:
    """Whether data.chat_template holds the template itself (Jinja tags) rather than the path of a file."""
    return "{{" in value or "{%" in value


# Rendered once when data.chat_template is set, so a template that cannot render fails before any record does.
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def use_chat_template(tokenizer, value: str | None) -> None:
    """Give the tokenizer data.chat_template (a template or a file holding one); None keeps the model's. Set on
    the tokenizer itself, so the checkpoints and the final model carry the template they were trained with."""
    if value is None:
        return
    where = "the template" if is_template_text(value) else f"'{value}'"
    text = value if is_template_text(value) else read_text(value, "data.chat_template")
    try:
        for generation_prompt in (False, True):
            rendered = tokenizer.apply_chat_template(PROBE, chat_template=text, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja syntax or runtime errors: one line naming the option
        raise LisaError(f"data.chat_template: {where} does not render a user/assistant conversation "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if "Hello." not in rendered:
        raise LisaError(f"data.chat_template: {where} does not render the messages' content "
                        "(expected a loop over messages writing each message's content)")
    tokenizer.chat_template = text


def encode_conversations(conversations: list[tuple[str, list[dict]]], tokenizer, loss_on: str,
                         source: str) -> list[dict]:
    """Each (location, messages) encoded; a loss_on that leaves the whole set untrained is one line."""
    out, trained = [], 0
    for loc, messages in conversations:
        example, n = encode_chat_counted(tokenizer, messages, loc, loss_on)
        out.append(example)
        trained += n
    if out and not trained:
        raise LisaError(f"{source}: data.loss_on={loss_on} leaves no token trained in its {len(out)} examples "
                        "(only the EOS each one ends with); use data.loss_on=assistant or all")
    return out


def load_chat(records: list[tuple[str, Any]], tokenizer, system_prompt: str | None = None,
              loss_on: str = "assistant", source: str = "data") -> list[dict]:
    need_template(tokenizer, "chat")
    return encode_conversations([(loc, with_system(check_messages(loc, rec), system_prompt)) for loc, rec in records],
                                tokenizer, loss_on, source)


def load_sharegpt(records: list[tuple[str, Any]], tokenizer, system_prompt: str | None = None,
                  loss_on: str = "assistant", source: str = "data") -> list[dict]:
    need_template(tokenizer, "sharegpt")
    return encode_conversations([(loc, with_system(sharegpt_messages(loc, rec), system_prompt))
                                 for loc, rec in records], tokenizer, loss_on, source)

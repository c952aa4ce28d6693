"""Conversations, loss on every assistant turn and nothing else (rendered with the tokenizer's chat template).

chat:     {"messages": [{"role": system | user | assistant | tool, "content"}, ...]}
sharegpt: {"conversations": [{"from": human | user | gpt | assistant | model | system, "value"}, ...]}
Both may have several turns and a system message; a top-level `system` field (ShareGPT, LLaMA-Factory) or else
`data.system_prompt` is the system message of every conversation that brings none of its own. Either format's
messages may use the other's keys (role/content or from/value); `data.message_keys` names other keys and
`data.roles` maps other role names (human: user, bot: assistant), as axolotl and LLaMA-Factory allow.
Tool use: a record's `tools` (a list of JSON schemas, or that list as a JSON string, as LLaMA-Factory writes it)
goes to the template's `tools`; assistant messages keep their `tool_calls`, tool messages (role tool, or
LLaMA-Factory's observation) their `tool_call_id`/`name`, and LLaMA-Factory's function_call turns become
assistant tool_calls. Tool results are prompt: they carry no loss.
`data.loss_on` picks the tokens that carry loss (every assistant turn, the last one, or all);
`data.chat_template` replaces the model's template (a file or the template itself).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import LisaError, first_line
from ..schema import read_text
from .render import encode_chat_located, template_name

log = logging.getLogger("lisatune.data")

ROLES = ("system", "user", "assistant")
TOOL = "tool"
CHAT_ROLES = ROLES + (TOOL,)  # the roles a template is given
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}
# Tool turns as datasets name them, accepted in a conversation that has tools (a `tools` field or tool_calls):
# elsewhere a tool turn is more likely a mislabelled one.
TOOL_ROLES = {"tool": TOOL, "observation": TOOL, "function": TOOL, "function_call": "assistant"}
KEYS = {"chat": ("role", "content"), "sharegpt": ("from", "value")}  # each format's own message keys
FIELD = {"chat": "messages", "sharegpt": "conversations"}


@dataclass(frozen=True)
class ChatOptions:
    """The data options that shape a conversation (DataConfig's, or the defaults)."""
    system_prompt: str | None = None
    loss_on: str = "assistant"
    roles: dict[str, str] = field(default_factory=dict)  # the record's role name -> a template role
    message_keys: dict[str, str] = field(default_factory=dict)  # role / content -> the record's key


def _keys(turn: dict, fmt: str, message_keys: dict[str, str]) -> tuple[str, str]:
    """The (role, content) keys of a message: data.message_keys', else the format's own, else the other format's
    where the message has that role key (a ShareGPT file in OpenAI keys is common, and the reverse)."""
    own = KEYS[fmt]
    if message_keys:
        return message_keys.get("role", own[0]), message_keys.get("content", own[1])
    other = KEYS["sharegpt" if fmt == "chat" else "chat"]
    # .get: a datasets source gives every row all the keys of the column's struct, the absent ones None
    return other if turn.get(own[0]) is None and turn.get(other[0]) is not None else own


def _unknown_role(loc: str, fmt: str, i: int, who: Any, names: dict[str, str], opts: ChatOptions) -> LisaError:
    builtin = [n for n in names if n not in opts.roles]
    mapped = ""
    if opts.roles:
        mapped = f", or a name data.roles maps: {', '.join(f'{k}: {v}' for k, v in opts.roles.items())}"
    if fmt == "chat":
        expected = ", ".join(builtin[:-1]) + f" or {builtin[-1]}"
        return LisaError(f"{loc}: message {i} has role {who!r} (expected {expected}{mapped})")
    return LisaError(f"{loc}: turn {i} is from {who!r} (expected {', '.join(builtin)}{mapped})")


def _tools(loc: str, rec: dict) -> list[dict] | None:
    tools = rec.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory keeps the schemas as a JSON string
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise LisaError(f"{loc}: 'tools' is a string but not JSON ({e.msg})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise LisaError(f"{loc}: 'tools' is not a list of tool schemas (JSON objects)")
    # LLaMA-Factory writes a bare function schema; templates read the OpenAI form {"type": "function", "function"}.
    return [{"type": "function", "function": t} if "name" in t and "function" not in t else t for t in tools]


def _tool_calls(loc: str, what: str, value: str) -> list[dict]:
    """LLaMA-Factory's function_call text ({"name", "arguments"}, or a list of them) as OpenAI tool_calls."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                           for c in calls):
        raise LisaError(f"{loc}: {what} is a function_call but not a JSON call "
                        '{"name": ..., "arguments": {...}} (or a list of them)')
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def conversation(loc: str, rec: dict, fmt: str, opts: ChatOptions) -> tuple[list[dict], list[dict] | None]:
    """A record's messages, as the template is given them, and its tools (None: none)."""
    name = FIELD[fmt]
    turns = rec.get(name)
    if not isinstance(turns, list) or not turns:
        raise LisaError(f"{loc}: record has no '{name}' list (or it is empty)")
    tools = _tools(loc, rec)
    with_tools = tools is not None or any(isinstance(t, dict) and t.get("tool_calls") for t in turns)
    names = {**(dict(zip(ROLES, ROLES)) if fmt == "chat" else SHAREGPT_ROLES), **(TOOL_ROLES if with_tools else {}),
             **opts.roles}
    noun = "message" if fmt == "chat" else "turn"
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise LisaError(f"{loc}: {noun} {i} is not a JSON object")
        role_key, content_key = _keys(t, fmt, opts.message_keys)
        who = t.get(role_key)
        if who is None and opts.message_keys.get("role"):
            raise LisaError(f"{loc}: {noun} {i} has no '{role_key}' (data.message_keys.role; its keys: "
                            f"{', '.join(map(str, t)) or 'none'})")
        if not isinstance(who, str) or who not in names:
            raise _unknown_role(loc, fmt, i, who, names, opts)
        role, content = names[who], t.get(content_key)
        message: dict[str, Any] = {"role": role}
        if role == "assistant" and who == "function_call" and isinstance(content, str):
            message |= {"content": "", "tool_calls": _tool_calls(loc, f"{noun} {i}", content)}
        elif role == "assistant" and isinstance(t.get("tool_calls"), list) and content is None:
            message |= {"content": ""}  # a pure tool call (OpenAI writes content null)
        elif not isinstance(content, str):
            raise LisaError(f"{loc}: {noun} {i} has no '{content_key}' string")
        else:
            message["content"] = content
        # Only these keys reach the template: extra keys would change what some templates render.
        if role == "assistant" and isinstance(t.get("tool_calls"), list):
            message["tool_calls"] = t["tool_calls"]
        if role == TOOL:
            message |= {k: t[k] for k in ("tool_call_id", "name") if isinstance(t.get(k), str)}
        messages.append(message)
    system = rec.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if fmt == "chat":
        if messages[-1]["role"] != "assistant":
            # Trailing non-assistant turns would carry no loss; most likely the file is cut or mislabelled.
            raise LisaError(f"{loc}: the last message has role {messages[-1]['role']!r} (expected assistant)")
        return messages, tools
    # ShareGPT: up to the last assistant turn (human turns after it carry no loss: dumps often end on an unanswered
    # question).
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LisaError(f"{loc}: the conversation has no assistant turn (from gpt, assistant or model)")
    return messages[: last + 1], tools


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
    # for errors that name the template (render.template_name)
    tokenizer.lisatune_template = "data.chat_template" + ("" if is_template_text(value) else f" '{value}'")


def _check_tools(loc: str, tokenizer, messages: list[dict], tools: list[dict] | None, rendered: str) -> None:
    """A template that ignores tools would train on a conversation without them, silently: each tool's and each
    call's function name must appear in the rendering."""
    def name(entry: Any) -> Any:  # OpenAI nests it: {"type": "function", "function": {"name": ...}}
        inner = entry.get("function", entry) if isinstance(entry, dict) else None
        return inner.get("name") if isinstance(inner, dict) else None

    wanted = [(name(t), "tools") for t in tools or []]
    wanted += [(name(c), "tool_calls") for m in messages for c in m.get("tool_calls", [])]
    for function, where in wanted:
        if isinstance(function, str) and function not in rendered:
            raise LisaError(f"{loc}: {template_name(tokenizer)} does not render the record's {where} (function "
                            f"'{function}' is not in its rendering); use a template with tool support "
                            "(data.chat_template)")


def encode_conversations(conversations: list[tuple[str, list[dict], list[dict] | None]], tokenizer, loss_on: str,
                         source: str) -> list[dict]:
    """Each (location, messages, tools) encoded; a loss_on that leaves the whole set untrained is one line."""
    out, trained, whole = [], 0, 0
    for loc, messages, tools in conversations:
        example, n, located = encode_chat_located(tokenizer, messages, loc, loss_on, tools)
        if tools or any("tool_calls" in m for m in messages):
            _check_tools(loc, tokenizer, messages, tools, tokenizer.decode(example["input_ids"]))
        out.append(example)
        trained += n
        whole += located
    if out and not trained:
        raise LisaError(f"{source}: data.loss_on={loss_on} leaves no token trained in its {len(out)} examples "
                        "(only the EOS each one ends with); use data.loss_on=assistant or all")
    if whole:
        log.info("%s: %s re-renders earlier turns (%d of %d conversations render differently as a prefix, e.g. "
                 "earlier reasoning dropped): their assistant turns are located in the whole conversation", source,
                 template_name(tokenizer), whole, len(out))
    return out


def load_conversations(records: list[tuple[str, Any]], tokenizer, fmt: str, opts: ChatOptions = ChatOptions(),
                       source: str = "data") -> list[dict]:
    need_template(tokenizer, fmt)
    conversations = []
    for loc, rec in records:
        messages, tools = conversation(loc, rec, fmt, opts)
        conversations.append((loc, with_system(messages, opts.system_prompt), tools))
    return encode_conversations(conversations, tokenizer, opts.loss_on, source)


def load_chat(records: list[tuple[str, Any]], tokenizer, opts: ChatOptions = ChatOptions(),
              source: str = "data") -> list[dict]:
    return load_conversations(records, tokenizer, "chat", opts, source)


def load_sharegpt(records: list[tuple[str, Any]], tokenizer, opts: ChatOptions = ChatOptions(),
                  source: str = "data") -> list[dict]:
    return load_conversations(records, tokenizer, "sharegpt", opts, source)

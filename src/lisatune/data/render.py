"""Turning conversations into token ids with loss masks.

Every piece of text is tokenized with add_special_tokens=False and the pieces are concatenated:
the prompt is then tokenized exactly as it will be at generation time (see encode_prompt), and
response tokens are exactly what the model has to produce after it.
"""
from __future__ import annotations

import re

from ..errors import LisaError, first_line

IGNORE = -100  # label of tokens that carry no loss (torch's cross-entropy ignore_index)
# Used when the tokenizer has no chat template (base models).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LisaError("the tokenizer has no EOS token, which marks where a response ends")
    return tokenizer.eos_token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _chat(tokenizer, messages: list[dict], generation_prompt: bool, loc: str, tools: list | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, e.g. a template that rejects a 'system' role
        raise LisaError(f"{loc}: {template_name(tokenizer)} failed ({type(e).__name__}: {first_line(e)})") from None


def render_prompt(tokenizer, question: str) -> str:
    """The text a model is given to answer `question`; tokenize it with add_special_tokens=False."""
    if tokenizer.chat_template:
        return _chat(tokenizer, [{"role": "user", "content": question}], True, "prompt")
    # A base model's tokenizer may add BOS by itself; the plain prompt carries it explicitly instead.
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    return (tokenizer.bos_token if starts_with_bos else "") + PLAIN_PROMPT.format(instruction=question)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of render_prompt, i.e. the prompt exactly as training saw it."""
    return _ids(tokenizer, render_prompt(tokenizer, question))


LOSS_ON = ("assistant", "last_assistant", "all")  # data.loss_on: which tokens of a conversation carry loss


def encode_chat(tokenizer, messages: list[dict], loc: str, loss_on: str = "assistant",
                tools: list | None = None) -> dict[str, list[int]]:
    """Token ids and labels of a conversation; encode_chat_counted without the count."""
    return encode_chat_counted(tokenizer, messages, loc, loss_on, tools)[0]


def encode_chat_counted(tokenizer, messages: list[dict], loc: str, loss_on: str = "assistant",
                        tools: list | None = None) -> tuple[dict[str, list[int]], int]:
    """encode_chat_located without how the turns were located."""
    example, trained, _ = encode_chat_located(tokenizer, messages, loc, loss_on, tools)
    return example, trained


def encode_chat_located(tokenizer, messages: list[dict], loc: str, loss_on: str = "assistant",
                        tools: list | None = None) -> tuple[dict[str, list[int]], int, bool]:
    """Loss on assistant turns (loss_on "assistant"), on the last one only ("last_assistant"), or on every token
    ("all"); also the number of tokens the conversation itself trains (the EOS appended here not counted), and
    whether the turns were located in the whole conversation (_generation or _located) rather than incrementally.
    Tool messages and the `tools` given to the template are prompt: they carry no loss (but with "all").

    The conversation is rendered incrementally: the text up to each assistant message (with the
    generation prompt) is a prompt, the text that message adds is its reply. A template that re-renders history
    (the rendering of a prefix is not a prefix of the whole) is rendered whole once instead, and the replies are
    located in it (_generation, else _located). Whitespace after a turn is masked, and the example ends with EOS
    so the model learns to stop.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if loss_on == "last_assistant" else None
    pieces = _incremental(tokenizer, messages, loc, tools)
    whole = pieces is None
    if whole:
        pieces = _generation(tokenizer, messages, loc, tools) or _located(tokenizer, messages, loc, tools)
    if pieces is None:
        raise LisaError(f"{loc}: {template_name(tokenizer)} renders neither a conversation as a prefix of its "
                        "continuation nor each assistant turn's prompt as a prefix of the whole conversation, so "
                        "assistant turns cannot be located; set data.chat_template to a template that does")
    ids: list[int] = []
    labels: list[int] = []
    for text, turn in pieces:
        t = _ids(tokenizer, text)
        train = loss_on == "all" or (turn is not None and (loss_on != "last_assistant" or turn == last))
        ids.extend(t)
        labels.extend(t if train else [IGNORE] * len(t))
    trained = sum(label != IGNORE for label in labels)
    eos = eos_id(tokenizer)
    if not labels or labels[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids, "labels": labels}, trained, whole


Pieces = list[tuple[str, "int | None"]]  # the conversation's text in order: (text, the assistant turn it replies in)


def _incremental(tokenizer, messages: list[dict], loc: str, tools: list | None) -> Pieces | None:
    """Prompt and reply pieces rendered turn by turn; None where a prefix of the conversation does not render as a
    prefix of its continuation (a template that re-renders history, e.g. drops earlier turns' reasoning)."""
    pieces: Pieces = []
    done = ""  # the text already in pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:i], True, loc, tools)
        full = _chat(tokenizer, messages[: i + 1], False, loc, tools)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return None
        reply = full[len(prompt):].rstrip()
        pieces += [(prompt[len(done):], None), (reply, i)]
        done = prompt + reply
    return pieces


GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


def _generation(tokenizer, messages: list[dict], loc: str, tools: list | None) -> Pieces | None:
    """A template that marks assistant text with {% generation %} tags says itself where the turns are
    (transformers' return_assistant_tokens_mask): the whole conversation, each run of marked tokens the reply of
    the next assistant message; None for a template without the tags, or runs that do not match the turns."""
    if not GENERATION.search(tokenizer.chat_template or ""):
        return None
    whole = _chat(tokenizer, messages, False, loc, tools)
    try:
        marked = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)["assistant_masks"]
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # a slow tokenizer (no offsets) or a template transformers cannot mask: the next fallback
        return None
    if len(enc["input_ids"]) != len(marked):
        return None
    spans: list[list[int]] = []  # [start, end) in characters of each run of marked tokens
    for (start, end), flag, before in zip(enc["offset_mapping"], marked, [0, *marked]):
        if flag and before:
            spans[-1][1] = end
        elif flag:
            spans.append([start, end])
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(spans) != len(turns):
        return None
    pieces: Pieces = []
    done = 0
    for (start, end), turn in zip(spans, turns):
        pieces += [(whole[done:start], None), (whole[start:end], turn)]
        done = end
    return pieces


def _located(tokenizer, messages: list[dict], loc: str, tools: list | None) -> Pieces | None:
    """The fallback for templates that re-render history: the whole conversation rendered once, each assistant turn
    from the end of its prompt (which must be a prefix of the whole) to the template's end-of-turn text (or, for a
    template without one, the end of the turn's content); None where that does not hold."""
    whole = _chat(tokenizer, messages, False, loc, tools)
    end_of_turn = _end_of_turn(tokenizer)
    pieces: Pieces = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:i], True, loc, tools)
        if not whole.startswith(prompt) or len(prompt) < done:
            return None
        mark = end_of_turn or message.get("content") or ""
        end = whole.find(mark, len(prompt)) if mark else -1
        if end < 0:
            return None
        end += len(mark)
        pieces += [(whole[done: len(prompt)], None), (whole[len(prompt): end], i)]
        done = end
    return pieces


END_PROBE = "Hello."  # an assistant reply whose rendering shows the text a template closes a turn with


def _end_of_turn(tokenizer) -> str:
    """The text the template writes after an assistant reply (e.g. <|im_end|>), stripped; "" if none."""
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": END_PROBE}], tokenize=False)
    except Exception:  # a template that refuses this probe: the content itself bounds each turn
        return ""
    at = full.find(END_PROBE, len(prompt) if full.startswith(prompt) else 0)
    return full[at + len(END_PROBE):].strip() if at >= 0 else ""


def template_name(tokenizer) -> str:
    """The template in words, for errors: data.chat_template's (see chat.use_chat_template) or the model's."""
    given = getattr(tokenizer, "lisatune_template", None)
    if given:
        return given
    name = getattr(tokenizer, "name_or_path", "")
    return f"the chat template of '{name}'" if name else "the tokenizer's chat template"


def encode_pair(tokenizer, instruction: str, response: str, loc: str) -> dict[str, list[int]]:
    """One prompt -> response example: a chat if the tokenizer has a template, else PLAIN_PROMPT."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return encode_chat(tokenizer, messages, loc)
    prompt = encode_prompt(tokenizer, instruction)
    reply = _ids(tokenizer, response) + [eos_id(tokenizer)]
    return {"input_ids": prompt + reply, "labels": [IGNORE] * len(prompt) + reply}

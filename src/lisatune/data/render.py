"""Turning conversations into token ids with loss masks.

Every piece of text is tokenized with add_special_tokens=False and the pieces are concatenated:
the prompt is then tokenized exactly as it will be at generation time (see encode_prompt), and
response tokens are exactly what the model has to produce after it.
"""
from __future__ import annotations

from ..errors import LisaError

IGNORE = -100  # label of tokens that carry no loss (torch's cross-entropy ignore_index)
# Used when the tokenizer has no chat template (base models).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LisaError("the tokenizer has no EOS token, which marks where a response ends")
    return tokenizer.eos_token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _chat(tokenizer, messages: list[dict], generation_prompt: bool, loc: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, e.g. a template that rejects a 'system' role
        raise LisaError(f"{loc}: the tokenizer's chat template failed ({type(e).__name__}: {e})") from None


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


def encode_chat(tokenizer, messages: list[dict], loc: str, loss_on: str = "assistant") -> dict[str, list[int]]:
    """Token ids and labels of a conversation; encode_chat_counted without the count."""
    return encode_chat_counted(tokenizer, messages, loc, loss_on)[0]


def encode_chat_counted(tokenizer, messages: list[dict], loc: str,
                        loss_on: str = "assistant") -> tuple[dict[str, list[int]], int]:
    """Loss on assistant turns (loss_on "assistant"), on the last one only ("last_assistant"), or on every token
    ("all"); also the number of tokens the conversation itself trains (the EOS appended here not counted).

    The conversation is rendered incrementally: the text up to each assistant message (with the
    generation prompt) is a prompt, the text that message adds is its reply. Whitespace after a turn
    is masked, and the example ends with EOS so the model learns to stop.
    """
    ids: list[int] = []
    labels: list[int] = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if loss_on == "last_assistant" else None

    def add(text: str, train: bool) -> None:
        t = _ids(tokenizer, text)
        ids.extend(t)
        labels.extend(t if train else [IGNORE] * len(t))

    done = ""  # the text already turned into tokens
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:i], True, loc)
        full = _chat(tokenizer, messages[: i + 1], False, loc)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LisaError(f"{loc}: the tokenizer's chat template does not render a conversation as a prefix "
                            f"of its continuation, so assistant turns cannot be located")
        reply = full[len(prompt):].rstrip()
        add(prompt[len(done):], loss_on == "all")
        add(reply, loss_on != "last_assistant" or i == last)
        done = prompt + reply
    trained = sum(label != IGNORE for label in labels)
    eos = eos_id(tokenizer)
    if not labels or labels[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids, "labels": labels}, trained


def encode_pair(tokenizer, instruction: str, response: str, loc: str) -> dict[str, list[int]]:
    """One prompt -> response example: a chat if the tokenizer has a template, else PLAIN_PROMPT."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return encode_chat(tokenizer, messages, loc)
    prompt = encode_prompt(tokenizer, instruction)
    reply = _ids(tokenizer, response) + [eos_id(tokenizer)]
    return {"input_ids": prompt + reply, "labels": [IGNORE] * len(prompt) + reply}

"""Alpaca records: {"instruction", "input" (optional), "output"}, and LLaMA-Factory's optional "system" (the
system message) and "history" (earlier [instruction, response] pairs of the same conversation, oldest first).

With a chat template the record is a conversation: system, history turns, the instruction, the output; every
response carries loss (as LLaMA-Factory trains, mask_history false). Without one, the plain prompt: the system
text, then each pair as an Instruction/Response block whose response (with EOS) carries loss."""
from __future__ import annotations

from typing import Any

from ..errors import LisaError
from .records import string_field
from .render import IGNORE, PLAIN_PROMPT, _ids, encode_chat, encode_pair, eos_id, render_prompt


def history_of(loc: str, rec: dict) -> list[tuple[str, str]]:
    history = rec.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise LisaError(f"{loc}: 'history' is not a list of [instruction, response] pairs "
                        f"(got {type(history).__name__})")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise LisaError(f"{loc}: history[{i}] is not a pair [instruction, response] of strings")
    return [tuple(pair) for pair in history]


def encode_with_history(tokenizer, system: str | None, history: list[tuple[str, str]], instruction: str,
                        response: str, loc: str) -> dict[str, list[int]]:
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in [*history, (instruction, response)]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return encode_chat(tokenizer, messages, loc)
    eos = eos_id(tokenizer)
    head = render_prompt(tokenizer, "")[: -len(PLAIN_PROMPT.format(instruction=""))]  # BOS where the model has one
    ids = _ids(tokenizer, head + (f"{system}\n\n" if system else ""))
    labels = [IGNORE] * len(ids)
    for i, (q, a) in enumerate([*history, (instruction, response)]):
        prompt = _ids(tokenizer, ("\n\n" if i else "") + PLAIN_PROMPT.format(instruction=q))
        reply = _ids(tokenizer, a) + [eos]
        ids += prompt + reply
        labels += [IGNORE] * len(prompt) + reply
    return {"input_ids": ids, "labels": labels}


def load_alpaca(records: list[tuple[str, Any]], tokenizer) -> list[dict]:
    examples = []
    for loc, rec in records:
        instruction = string_field(loc, rec, "instruction")
        extra = string_field(loc, rec, "input", required=False)
        output = string_field(loc, rec, "output")
        system = string_field(loc, rec, "system", required=False)
        history = history_of(loc, rec)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        if system or history:
            examples.append(encode_with_history(tokenizer, system, history, prompt, output, loc))
        else:
            examples.append(encode_pair(tokenizer, prompt, output, loc))
    return examples

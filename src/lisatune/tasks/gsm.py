"""The documents of the shipped GSM-symbolic tasks: the held-out problems of lisatune's GSM data.

lm-eval calls these as `custom_dataset` with the task's metadata. lisatune passes two entries (absent when
lm-eval is run by hand): `lisatune_gsm`, the data options that choose the held-out templates (a run on GSM
data passes its own, so these problems are never ones it trained on), and `lisatune_plain_prompt`, true for
a tokenizer without a chat template, whose prompt is then the plain instruction prompt training used.
"""
from __future__ import annotations

import random
import re
from decimal import Decimal

import datasets

from ..data import DataConfig, gsm_eval_items
from ..data.render import PLAIN_PROMPT

N_CHOICES = 4
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _docs(metadata: dict) -> list[dict]:
    cfg = DataConfig.build(format="gsm", **metadata.get("lisatune_gsm", {}))
    plain = metadata.get("lisatune_plain_prompt", False)
    # With a chat template lm-eval renders the question as the user turn, exactly as training does.
    return [{"question": it["question"], "number": it["number"], "template": it["template"],
             "prompt": PLAIN_PROMPT.format(instruction=it["question"]) if plain else it["question"]}
            for it in gsm_eval_items(cfg)]


def problems(**metadata) -> dict[str, datasets.Dataset]:
    """lisatune_gsm: answer by generation; right when the last `#### N` is the number."""
    return {"test": datasets.Dataset.from_list(_docs(metadata))}


def distractors(number: str, question: str, n: int) -> list[str]:
    """n wrong answers for `number`: numbers of the question first (copying one is the usual slip), then
    nearby values; the same for the same problem, every time."""
    right = Decimal(number)
    seen = {right}
    out = []
    candidates = [Decimal(x) for x in _NUMBER.findall(question.replace(",", ""))]
    random.Random(question).shuffle(candidates)
    candidates += [right + d for d in (1, -1, 2, -2, 10, -10)] + [right * 2, right * 10]
    for c in candidates:
        if c not in seen:
            seen.add(c)
            out.append(c)
        if len(out) == n:
            break
    return [format(c.normalize(), "f") for c in out]


def choices(**metadata) -> dict[str, datasets.Dataset]:
    """lisatune_gsm_mc: the log-likelihood of `#### N` for the right number and N_CHOICES - 1 wrong ones."""
    docs = _docs(metadata)
    for d in docs:
        options = [d["number"], *distractors(d["number"], d["question"], N_CHOICES - 1)]
        random.Random(d["question"]).shuffle(options)  # the right one at no fixed position
        d["choices"] = [f"#### {o}" for o in options]
        d["label"] = options.index(d["number"])
    return {"test": datasets.Dataset.from_list(docs)}

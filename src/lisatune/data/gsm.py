"""GSM-symbolic: grade-school math problems generated from templates (multilingual_gsm_symbolic).

Whole templates are held out for evaluation, so the eval score measures solving unseen problems,
not recalling a training problem with other numbers. The data is a pure function of the config.
"""
from __future__ import annotations

import contextlib
import functools
import random
import re

import numpy as np

from ..errors import LisaError
from .config import DataConfig
from .render import encode_pair

_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations, e.g. <<5*88=440>>: tool markup, not prose
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_MAX_TRIES = 20_000  # rejection-sampling budget per problem before enumerating every combination


def extract_answer(text: str) -> str | None:
    """The number after the last '####' (commas, '$' and a trailing '.' removed), or None."""
    if "####" not in text:
        return None
    words = text.rsplit("####", 1)[1].split()
    if not words:
        return None
    number = words[0].replace(",", "").replace("$", "").rstrip(".")
    if not _NUMBER.fullmatch(number):
        return None
    if "." in number:  # 3.50 and 3.5 are the same answer
        number = number.rstrip("0").rstrip(".")
    return number


@functools.cache
def _templates(language: str) -> tuple:
    import multilingual_gsm_symbolic as gsm  # lazy: only the gsm format needs it

    templates = gsm.load_data(language)
    if not templates:
        available = ", ".join(gsm.available_languages())
        raise LisaError(f"data.gsm_language {language!r} has no GSM-symbolic templates (available: {available})")
    return tuple(templates)


def split_templates(cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) template indices: gsm_eval_templates of them chosen by a seeded shuffle."""
    n = len(_templates(cfg.gsm_language)[: cfg.gsm_templates])
    if cfg.gsm_eval_templates >= n:
        raise LisaError(f"data.gsm_eval_templates={cfg.gsm_eval_templates} leaves no training template "
                        f"(there are {n})")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[: cfg.gsm_eval_templates])
    return [i for i in range(n) if i not in held], sorted(held)


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Seed the global RNGs and restore them afterwards: generation stays deterministic should a release
    of the generator draw from them, and callers' random streams are left alone."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _generate(template, n: int, rng: random.Random) -> list:
    """Same distribution as template.generate_questions, but fast.

    generate_questions first enumerates every combination of the constrained variables (up to
    ~9M for some templates) and every value of the others (~660k name orders for one): 446 s here
    for 8 problems of each of the 100 templates. Rejection sampling a uniformly random combination
    until it meets the conditions draws from the same uniform distribution over valid combinations
    in milliseconds (the few templates with very rare valid combinations fall back to enumerating
    them, once), and the other variables are drawn directly, as the library does when given no
    precomputed choices.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value
    from multilingual_gsm_symbolic.load_data import load_replacements

    replacements = load_replacements(template.language)
    private = ("_get_all_possible_assignments", "_condition_asts", "_generate_question",
               "_evaluate_constrained_init_lines")
    if not all(hasattr(template, name) for name in private):  # another release of the library
        return template.generate_questions(n, replacements, rng=rng, verbose=False)
    lines = template.constrained_lines
    choices = list(template._get_all_possible_assignments(lines, replacements).values()) if lines else []
    every_valid = None

    def valid_combination() -> dict:
        nonlocal every_valid
        for _ in range(_MAX_TRIES):
            combo = {k: parse_value(v) for line in choices for k, v in rng.choice(line).items()}
            if all(eval_node(c, EVAL_CONTEXT_HELPERS | combo) for c in template._condition_asts):
                return combo
        if every_valid is None:
            every_valid = template._evaluate_constrained_init_lines(lines, replacements)
        return rng.choice(every_valid)

    return [template._generate_question(replacements, rng, [valid_combination()] if lines else None)
            for _ in range(n)]


@functools.cache  # a run asks for the same problems more than once (train/eval loss, exact-match eval)
def _problems(language: str, index: int, seed: int, n: int) -> tuple[tuple[str, str, str], ...]:
    """Up to n distinct (question, answer, number) of one template: a pure function of the arguments."""
    template = _templates(language)[index]
    key = f"lisatune-gsm:{seed}:{language}:{template.id_shuffled}"  # str seeds hash stably across runs
    with _seeded_global_rng(random.Random(key).getrandbits(32)):
        questions = _generate(template, n, random.Random(key))
    out = {}
    for q in questions:
        answer = _CALCULATOR.sub("", q.answer)
        number = extract_answer(answer)
        if number is None:
            raise LisaError(f"GSM template {template.id_shuffled} generated an answer without '#### <number>'")
        out.setdefault(q.question, (q.question, answer, number))  # duplicates would weigh a problem twice
    return tuple(out.values())


def _items(cfg: DataConfig, indices: list[int], n: int) -> list[dict]:
    per_template = [(_templates(cfg.gsm_language)[i].id_shuffled, _problems(cfg.gsm_language, i, cfg.seed, n))
                    for i in indices]
    # Variant-major order: variant 0 of every template first, so capping the list keeps all templates.
    return [{"question": p[v][0], "answer": p[v][1], "number": p[v][2], "template": tid}
            for v in range(n) for tid, p in per_template if v < len(p)]


def gsm_eval_items(cfg: DataConfig) -> list[dict]:
    """Held-out problems for exact-match evaluation: {question, answer, number, template}.

    Ask the model with render_prompt(tokenizer, item["question"]); it is right when
    extract_answer(generated text) == item["number"]. Capped at cfg.val_max_examples.
    """
    items = _items(cfg, split_templates(cfg)[1], cfg.gsm_eval_variants)
    return items[: cfg.val_max_examples]


def gsm_train_items(cfg: DataConfig) -> list[dict]:
    return _items(cfg, split_templates(cfg)[0], cfg.gsm_variants)


def encode_items(items: list[dict], tokenizer) -> list[dict]:
    return [encode_pair(tokenizer, it["question"], it["answer"], f"GSM template {it['template']}") for it in items]

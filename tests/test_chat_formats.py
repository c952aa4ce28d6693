"""#28: conversations as peers write them (field and role names, tools, LLaMA-Factory's system/history,
ShareGPT's system), templates that re-render history (Qwen3-like), split slices, and a DataConfig that imports
without torch."""
import json
import subprocess
import sys

import pytest

from helpers import EOS, tiny_tokenizer
from lisatune.data import DataConfig, load_splits
from lisatune.data.render import IGNORE
from lisatune.errors import LisaError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def trained_runs(tok, example):
    """The labelled tokens as text, one string per run of consecutive labelled tokens."""
    runs, run = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            assert label == i
            run.append(i)
    return runs + ([tok.decode(run)] if run else [])


def test_the_data_config_imports_no_torch_datasets_or_transformers():
    code = ("import sys, lisatune.data.config; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # and every name `from lisatune.data import ...` gave before still comes (lazily)
    import lisatune.data as data
    for name in data.__all__:
        assert callable(getattr(data, name)), name


def encode(tmp_path, records, fmt="chat", tok=None, **options):
    tok = tok or tiny_tokenizer(chat=True)
    train, _ = load_splits(DataConfig(format=fmt, path=write_jsonl(tmp_path / "d.jsonl", records), **options), tok)
    return tok, train


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- a template that re-renders history (Qwen3-like) ---------------------------------------------------------

# As Qwen3's: an assistant turn before the last user message is rendered without its <think> block, so the
# rendering of a prefix of the conversation is not a prefix of the rendering of the whole.
QWEN3_LIKE = (
    "{% set ns = namespace(last_query=0) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_query %}"
    "<|im_start|>assistant\n{{ m['content'].split('</think>')[-1].lstrip('\n') }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
THINKING = [{"role": "user", "content": "What is 2?"},
            {"role": "assistant", "content": "<think>\nsum\n</think>\n\nTwo."},
            {"role": "user", "content": "And 3?"},
            {"role": "assistant", "content": "<think>\nthree\n</think>\n\nThree."}]


def test_a_template_that_re_renders_history_falls_back_to_the_whole_conversation(tmp_path, caplog):
    tok = tiny_tokenizer(chat=True)
    tok.chat_template = QWEN3_LIKE
    whole = tok.apply_chat_template(THINKING, tokenize=False)
    assert "sum" not in whole  # the first turn's reasoning is dropped from the whole conversation
    with caplog.at_level("INFO", logger="lisatune"):
        _, train = encode(tmp_path, [{"messages": THINKING}], tok=tok)
    assert "re-renders earlier turns (1 of 1 conversations" in caplog.text
    # The tokens are the whole conversation as the template renders it; the mask covers each assistant turn as
    # rendered there (the first one without its reasoning), exact ids piece by piece.
    pieces = [("<|im_start|>user\nWhat is 2?<|im_end|>\n<|im_start|>assistant\n", False), ("Two.<|im_end|>", True),
              ("\n<|im_start|>user\nAnd 3?<|im_end|>\n<|im_start|>assistant\n", False),
              ("<think>\nthree\n</think>\n\nThree.<|im_end|>", True)]
    expected_ids = [i for text, _ in pieces for i in ids(tok, text)] + [tok.eos_token_id]
    expected_labels = [i if trained else IGNORE for text, trained in pieces for i in ids(tok, text)]
    assert train[0]["input_ids"] == expected_ids
    assert train[0]["labels"] == expected_labels + [tok.eos_token_id]
    assert tok.decode(train[0]["input_ids"]) == whole.rstrip() + EOS
    tok.chat_template = QWEN3_LIKE
    _, last = encode(tmp_path, [{"messages": THINKING}], tok=tok, loss_on="last_assistant")
    assert trained_runs(tok, last[0]) == [f"<think>\nthree\n</think>\n\nThree.<|im_end|>{EOS}"]


def test_a_template_whose_turns_cannot_be_located_is_one_line_naming_it(tmp_path):
    # The generation prompt is not how the template opens an assistant turn: no prefix of anything.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>bot {% endif %}")
    path = tmp_path / "odd.jinja"
    path.write_text(template)
    for value, name in ((template, "data.chat_template"), (str(path), f"data.chat_template '{path}'")):
        with pytest.raises(LisaError) as e:
            encode(tmp_path, [{"messages": THINKING}], chat_template=value)
        assert str(e.value).startswith(f"{tmp_path / 'd.jsonl'}:1: {name} renders neither a conversation as a "
                                       "prefix of its continuation nor each assistant turn's prompt")
        assert "\n" not in str(e.value)

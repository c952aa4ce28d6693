"""#28: conversations as peers write them (field and role names, tools, LLaMA-Factory's system/history,
ShareGPT's system), templates that re-render history (Qwen3-like), split slices, and a DataConfig that imports
without torch."""
import json
import subprocess
import sys

import pytest

from helpers import EOS, tiny_tokenizer, trained_runs, write_jsonl
from lisatune.data import DataConfig, load_splits
from lisatune.data.render import IGNORE
from lisatune.errors import LisaError


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


# ---- field and role names -------------------------------------------------------------------------------------

OPENAI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2?"},
          {"role": "assistant", "content": "Two."}]


def test_either_format_reads_the_others_message_keys(tmp_path):
    tok, chat = encode(tmp_path, [{"messages": OPENAI}])
    sharegpt_keys = [{"from": m["role"], "value": m["content"]} for m in OPENAI]
    assert encode(tmp_path, [{"messages": sharegpt_keys}], tok=tok)[1][0] == chat[0]
    assert encode(tmp_path, [{"conversations": OPENAI}], "sharegpt", tok=tok)[1][0] == chat[0]
    assert trained_runs(tok, chat[0]) == [f"Two.<|im_end|>{EOS}"]


def test_message_keys_and_roles_map_any_names(tmp_path):
    tok, chat = encode(tmp_path, [{"messages": OPENAI}])
    names = {"system": "instructions", "user": "customer", "assistant": "agent"}
    odd = [{"speaker": names[m["role"]], "text": m["content"]} for m in OPENAI]
    keys = {"role": "speaker", "content": "text"}
    roles = {"instructions": "system", "customer": "user", "agent": "assistant"}
    assert encode(tmp_path, [{"messages": odd}], tok=tok, message_keys=keys, roles=roles)[1][0] == chat[0]
    # axolotl's direction: a template role -> the data's names
    axolotl = {"system": ["instructions"], "user": ["customer", "client"], "assistant": ["agent"]}
    assert DataConfig(format="chat", path="x.jsonl", roles=axolotl).roles == {**roles, "client": "user"}
    assert encode(tmp_path, [{"messages": odd}], tok=tok, message_keys=keys, roles=axolotl)[1][0] == chat[0]


def test_an_unknown_role_is_one_line_naming_the_line_the_role_and_the_mapping(tmp_path):
    records = [{"messages": OPENAI}, {"messages": [*OPENAI[:2], {"role": "bot", "content": "Two."}]}]
    path = tmp_path / "d.jsonl"
    with pytest.raises(LisaError) as e:
        encode(tmp_path, records, roles={"ai": "assistant", "human": "user"})
    assert str(e.value) == (f"{path}:2: message 2 has role 'bot' (expected system, user or assistant, or a name "
                            "data.roles maps: ai: assistant, human: user)")
    mapped = encode(tmp_path, records, roles={"bot": "assistant"})[1]
    assert mapped[1] == mapped[0]
    with pytest.raises(LisaError) as e:
        encode(tmp_path, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}],
               "sharegpt", roles={"ai": "assistant"})
    assert str(e.value) == (f"{path}:1: turn 1 is from 'bot' (expected system, human, user, gpt, assistant, model, "
                            "or a name data.roles maps: ai: assistant)")
    with pytest.raises(LisaError) as e:
        encode(tmp_path, [{"messages": [{"speaker": "user", "text": "Hi"}]}], message_keys={"role": "who"})
    assert str(e.value) == f"{path}:1: message 0 has no 'who' (data.message_keys.role; its keys: speaker, text)"


@pytest.mark.parametrize("options,message", [
    ({"roles": {"bot": "robot"}}, "data.roles: bot: 'robot' is not a role of the chat template (system, user, "
                                  "assistant, tool)"),
    ({"roles": {"robot": ["bot"]}}, "data.roles: robot: a list maps names to a template role, and 'robot' is not "
                                    "one (system, user, assistant, tool)"),
    ({"message_keys": {"text": "value"}}, "data.message_keys: 'text' is not a message part (role, content)"),
    ({"format": "alpaca", "roles": {"bot": "assistant"}}, "data: roles is for formats chat and sharegpt, not "
                                                          "'alpaca'"),
])
def test_bad_mappings_are_one_line_naming_the_field(options, message):
    with pytest.raises(LisaError) as e:
        DataConfig.build(**{"format": "chat", "path": "x.jsonl", **options})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sharegpts_top_level_system_is_the_system_message(tmp_path):
    turns = [{"from": "human", "value": "What is 2?"}, {"from": "gpt", "value": "Two."}]
    tok, train = encode(tmp_path, [{"system": "Be brief.", "conversations": turns}], "sharegpt",
                        system_prompt="Be verbose.")
    assert train[0] == encode(tmp_path, [{"messages": OPENAI}], tok=tok)[1][0]
    # a system turn of the conversation itself wins over the field, which wins over data.system_prompt
    own = [{"from": "system", "value": "Be brief."}, *turns]
    assert encode(tmp_path, [{"system": "Be verbose.", "conversations": own}], "sharegpt", tok=tok)[1] == train
    assert tok.decode(encode(tmp_path, [{"conversations": turns}], "sharegpt", tok=tok, system_prompt="Be brief.")[1][0]
                      ["input_ids"]) == tok.decode(train[0]["input_ids"])


# ---- tools ----------------------------------------------------------------------------------------------------

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function') | map(attribute='name') "
    "| join(', ') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI_TOOLS = {"tools": [{"type": "function", "function": WEATHER}],
                "messages": [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]},
                             {"role": "tool", "content": "18C", "tool_call_id": "1"},
                             {"role": "assistant", "content": "18 degrees."}]}
# LLaMA-Factory's ShareGPT with tools: function_call / observation turns, the schemas as a JSON string
LLAMA_FACTORY_TOOLS = {"tools": json.dumps([WEATHER]),
                       "conversations": [{"from": "human", "value": "Weather in Paris?"},
                                         {"from": "function_call",
                                          "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                                         {"from": "observation", "value": "18C"},
                                         {"from": "gpt", "value": "18 degrees."}]}


def test_tool_turns_are_rendered_by_the_template_and_carry_no_loss(tmp_path):
    tok, train = encode(tmp_path, [OPENAI_TOOLS], chat_template=TOOL_TEMPLATE)
    text = tok.decode(train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>tool\n18C<|im_end|>" in text
    assert trained_runs(tok, train[0]) == ['<call>get_weather {"city": "Paris"}</call><|im_end|>',
                                           f"18 degrees.<|im_end|>{EOS}"]
    _, factory = encode(tmp_path, [LLAMA_FACTORY_TOOLS], "sharegpt", chat_template=TOOL_TEMPLATE)
    assert factory[0] == train[0]


def test_a_template_that_drops_tools_is_one_line(tmp_path):
    with pytest.raises(LisaError) as e:
        encode(tmp_path, [OPENAI_TOOLS])  # the test ChatML template renders content only
    assert str(e.value) == (f"{tmp_path / 'd.jsonl'}:1: the tokenizer's chat template does not render the record's "
                            "tools (function 'get_weather' is not in its rendering); use a template with tool support "
                            "(data.chat_template)")
    # a tool turn in a conversation without tools is refused as the unknown role it then likely is
    with pytest.raises(LisaError, match=r":1: message 1 has role 'tool' \(expected system, user or assistant\)$"):
        encode(tmp_path, [{"messages": [OPENAI[1], {"role": "tool", "content": "2"}, OPENAI[2]]}])
    with pytest.raises(LisaError, match=r":1: turn 1 is a function_call but not a JSON call"):
        bad = dict(LLAMA_FACTORY_TOOLS, conversations=[LLAMA_FACTORY_TOOLS["conversations"][0],
                                                       {"from": "function_call", "value": "get_weather(Paris)"}])
        encode(tmp_path, [bad], "sharegpt", chat_template=TOOL_TEMPLATE)


# ---- LLaMA-Factory's alpaca system and history ----------------------------------------------------------------

HISTORY = {"system": "Be brief.", "history": [["What is 2?", "Two."]], "instruction": "And 3?", "output": "Three."}


def test_alpaca_system_and_history_are_the_conversation_before_the_instruction(tmp_path):
    conversation = [*OPENAI, {"role": "user", "content": "And 3?"}, {"role": "assistant", "content": "Three."}]
    tok, chat = encode(tmp_path, [{"messages": conversation}])
    _, alpaca = encode(tmp_path, [HISTORY], "alpaca", tok=tok)
    assert alpaca[0] == chat[0]  # every response trains, as LLaMA-Factory's default (mask_history false)
    assert trained_runs(tok, alpaca[0]) == ["Two.<|im_end|>", f"Three.<|im_end|>{EOS}"]


def test_alpaca_system_and_history_without_a_chat_template(tmp_path):
    tok, train = encode(tmp_path, [HISTORY], "alpaca", tok=tiny_tokenizer(chat=False))
    pieces = [("Be brief.\n\n### Instruction:\nWhat is 2?\n\n### Response:\n", False), ("Two.", True),
              ("\n\n### Instruction:\nAnd 3?\n\n### Response:\n", False), ("Three.", True)]
    expected = []
    for text, trained in pieces:
        expected += [(i, i if trained else IGNORE) for i in ids(tok, text)] + ([(tok.eos_token_id,) * 2] if trained
                                                                                else [])
    assert list(zip(train[0]["input_ids"], train[0]["labels"])) == expected


@pytest.mark.parametrize("history,message", [
    ([["What is 2?"]], "history[0] is not a pair [instruction, response] of strings"),
    ([["What is 2?", "Two."], ["a", 3]], "history[1] is not a pair [instruction, response] of strings"),
    ("What is 2?", "'history' is not a list of [instruction, response] pairs (got str)"),
])
def test_a_history_entry_that_is_not_a_pair_is_one_line(tmp_path, history, message):
    with pytest.raises(LisaError) as e:
        encode(tmp_path, [{"instruction": "a", "output": "b"}, dict(HISTORY, history=history)], "alpaca")
    assert str(e.value) == f"{tmp_path / 'd.jsonl'}:2: {message}"


# ---- split slices ---------------------------------------------------------------------------------------------

ROWS = [{"instruction": f"Add {a} and 1.", "output": f"The answer is {a + 1}."} for a in range(10)]


def test_split_slices_select_rows_of_files_saved_datasets_and_dataset_dicts(tmp_path):
    from datasets import Dataset, DatasetDict

    from lisatune.data import data_fingerprint
    tok = tiny_tokenizer(chat=True)
    whole, _ = load_splits(DataConfig(format="alpaca", path=write_jsonl(tmp_path / "a.jsonl", ROWS)), tok)
    ds = Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 10))}).save_to_disk(str(tmp_path / "dict"))
    for path in ["a.jsonl", "a.parquet", "saved"]:
        def rows(split):
            return load_splits(DataConfig(format="alpaca", path=str(tmp_path / path), split=split), tok)[0]
        assert rows("train[:3]") == whole[:3], path
        assert rows("train[80%:]") == whole[8:], path
        assert rows("train[-2:]") == whole[8:], path
        cfg = DataConfig(format="alpaca", path=str(tmp_path / path))
        assert data_fingerprint(cfg.model_copy(update={"split": "train[:3]"})) != data_fingerprint(cfg)
        assert data_fingerprint(cfg.model_copy(update={"split": "train[:4]"})) != data_fingerprint(
            cfg.model_copy(update={"split": "train[:3]"}))
    saved = str(tmp_path / "dict")
    assert load_splits(DataConfig(format="alpaca", path=saved, split="train[:2]+test[50%:]"), tok)[0] == \
        whole[:2] + whole[8:]
    train, val = load_splits(DataConfig(format="alpaca", path=saved, val_path=saved, val_split="test[:1]"), tok)
    assert train == whole[:6] and val == whole[6:7]


@pytest.mark.parametrize("path,split,message", [
    ("a.jsonl", "test[:2]", "data.split 'test[:2]': Unknown split \"test\". Should be one of ['train']. ('PATH' is "
                            "one split, train; the syntax is the datasets library's, e.g. train[:8], train[10%:], "
                            "train+test)"),
    ("a.jsonl", "train[1:2:3]", "data.split 'train[1:2:3]': Unrecognized instruction format: train[1:2:3] ('PATH' "
                                "is one split, train;"),
    ("a.jsonl", "train[5:2]", "PATH: data.split 'train[5:2]' selects no record"),
    ("dict", "validation[:2]", "data.split 'validation[:2]': Unknown split \"validation\". Should be one of "
                               "['train']. ('PATH' has splits train;"),
])
def test_a_bad_split_is_one_line_naming_data_split(tmp_path, path, split, message):
    from datasets import Dataset, DatasetDict
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(LisaError) as e:
        load_splits(DataConfig(format="alpaca", path=str(tmp_path / path), split=split), tiny_tokenizer(chat=True))
    assert message.replace("PATH", str(tmp_path / path)) in str(e.value) and "\n" not in str(e.value)


def test_a_split_slice_selects_paragraphs_of_a_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("What is the sum of two and three?\n\nThe answer is five.\n\nWrite a haiku.\n")
    tok = tiny_tokenizer(chat=False)
    first, _ = load_splits(DataConfig(format="text", path=str(path), split="train[:1]", max_length=8), tok)
    text = tok.decode([i for e in first for i in e["input_ids"]])
    assert text.startswith("What is the sum") and "answer" not in text
    with pytest.raises(LisaError, match=r"t\.txt: data\.split 'train\[3:\]' selects no paragraph$"):
        load_splits(DataConfig(format="text", path=str(path), split="train[3:]"), tok)


def test_a_template_that_fails_on_a_record_is_one_line_naming_the_record_and_the_template(tmp_path):
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported\nat all') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(LisaError) as e:
        encode(tmp_path, [{"messages": OPENAI[1:]}, {"messages": OPENAI}], chat_template=no_system)
    assert str(e.value) == (f"{tmp_path / 'd.jsonl'}:2: data.chat_template failed (TemplateError: System role not "
                            "supported)")


def test_rows_of_a_parquet_file_mixing_both_key_styles_read_alike(tmp_path):
    from datasets import Dataset
    sharegpt_keys = [{"from": m["role"], "value": m["content"]} for m in OPENAI]
    # arrow gives every message all four keys, the absent ones None
    Dataset.from_list([{"conversations": OPENAI}, {"conversations": sharegpt_keys}]).to_parquet(str(tmp_path / "m.pq"))
    (tmp_path / "m.parquet").write_bytes((tmp_path / "m.pq").read_bytes())
    tok = tiny_tokenizer(chat=True)
    train, _ = load_splits(DataConfig(format="sharegpt", path=str(tmp_path / "m.parquet")), tok)
    assert train[0] == train[1] == encode(tmp_path, [{"messages": OPENAI}], tok=tok)[1][0]


# Qwen3-like again, with no end-of-turn text (so the reasoning-stripped first turn cannot be found by its content),
# but its assistant text marked with {% generation %}: the template's own marks locate the turns.
GENERATION_QWEN3_LIKE = (
    "{% set ns = namespace(last_query=0) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}"
    "{% if loop.index0 < ns.last_query %}{{ m['content'].split('</think>')[-1].lstrip('\n') }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}")


def test_a_template_with_generation_marks_is_masked_by_them(tmp_path):
    from lisatune.data import render
    tok, train = encode(tmp_path, [{"messages": THINKING}], chat_template=GENERATION_QWEN3_LIKE)
    assert trained_runs(tok, train[0]) == ["Two.", f"<think>\nthree\n</think>\n\nThree.{EOS}"]
    assert tok.decode(train[0]["input_ids"]) == "user: What is 2?\nA: Two.\nuser: And 3?\nA: " \
                                                 f"<think>\nthree\n</think>\n\nThree.{EOS}"
    # without the marks the content-bounded fallback cannot find the first turn: the one-line refusal
    assert render._located(tok, THINKING, "x", None) is None

"""#28: data.loss_on (which tokens of a conversation carry loss) and data.chat_template (the template that renders
them), on a tiny tokenizer with a ChatML template."""

import pytest
import yaml

from helpers import CHATML, EOS, make_run_assets, tiny_tokenizer, trained_runs, write_jsonl
from lisatune.data import DataConfig, load_splits
from lisatune.errors import LisaError
from lisatune.recipe.config import load_config

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2?"},
                {"role": "assistant", "content": "Two."}, {"role": "user", "content": "And 3?"},
                {"role": "assistant", "content": "Three."}]
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2?"},
            {"from": "gpt", "value": "Two."}, {"from": "human", "value": "And 3?"}, {"from": "gpt", "value": "Three."}]


def one_example(tmp_path, fmt="chat", **options):
    records = [{"messages": CONVERSATION}] if fmt == "chat" else [{"conversations": SHAREGPT}]
    tok = tiny_tokenizer(chat=True)
    train, _ = load_splits(DataConfig(format=fmt, path=write_jsonl(tmp_path / "d.jsonl", records), **options), tok)
    return tok, train[0]


@pytest.mark.parametrize("fmt", ["chat", "sharegpt"])
def test_loss_on_picks_the_tokens_that_carry_loss(tmp_path, fmt):
    tok, default = one_example(tmp_path, fmt)
    assert trained_runs(tok, default) == ["Two.<|im_end|>", f"Three.<|im_end|>{EOS}"]
    tok, last = one_example(tmp_path, fmt, loss_on="last_assistant")
    assert trained_runs(tok, last) == [f"Three.<|im_end|>{EOS}"]
    assert last["input_ids"] == default["input_ids"]  # the same tokens, another mask
    tok, every = one_example(tmp_path, fmt, loss_on="all")
    assert every["labels"] == every["input_ids"] == default["input_ids"]
    assert tok.decode(every["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_loss_on_that_trains_nothing_is_one_line_naming_it(tmp_path):
    # A template with no end-of-turn text: an empty last reply adds no token, so last_assistant trains none.
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": ""}]}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = dict(format="chat", path=path, chat_template=template)
    assert load_splits(DataConfig(**cfg), tiny_tokenizer(chat=True))[0]  # the earlier replies train
    with pytest.raises(LisaError) as e:
        load_splits(DataConfig(**cfg, loss_on="last_assistant"), tiny_tokenizer(chat=True))
    assert str(e.value).startswith(f"{path}: data.loss_on=last_assistant leaves no token trained in its 3 examples")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def config(tmp_path, assets, **data):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "chat", "path": write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]),
                    **data},
           "train": {"output_dir": str(tmp_path / "run")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("sets,message", [
    (["data.loss_on=prompt"], "data.loss_on: Input should be 'assistant', 'last_assistant' or 'all'"),
    (["data.format=alpaca", "data.path=ASSETS/train.jsonl", "data.loss_on=all"],
     "data: loss_on is for formats chat and sharegpt, not 'alpaca'"),
    (["data.chat_template=/no/such/template.jinja"],
     "data.chat_template: neither a file nor a template (a template has {{ ... }} or {% ... %} tags)"),
])
def test_bad_chat_options_are_one_line_naming_the_field(tmp_path, assets, sets, message):
    with pytest.raises(LisaError) as e:
        load_config(config(tmp_path, assets), [s.replace("ASSETS", str(assets)) for s in sets])
    assert message in str(e.value) and "\n" not in str(e.value)


UPPER = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}")


@pytest.mark.parametrize("given", ["string", "file"])
def test_chat_template_replaces_the_models_and_stays_on_the_tokenizer(tmp_path, given):
    value = UPPER
    if given == "file":
        (tmp_path / "t.jinja").write_text(UPPER)
        value = str(tmp_path / "t.jinja")
    tok, ex = one_example(tmp_path, chat_template=value)
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>SYSTEM: Be brief.<|im_end|><|im_start|>USER: ")
    assert trained_runs(tok, ex) == ["Two.<|im_end|>", f"Three.<|im_end|>{EOS}"]
    assert tok.chat_template == UPPER  # saved with the checkpoints: generation renders as training did
    _, model_template = one_example(tmp_path)
    assert tok.decode(model_template["input_ids"]) != tok.decode(ex["input_ids"])
    assert tiny_tokenizer(chat=True).chat_template == CHATML


@pytest.mark.parametrize("template,reason", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("{{ raise_exception('no user turns here') }}", "no user turns here"),
    ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "does not render the messages' content"),
])
def test_a_chat_template_that_does_not_render_is_one_line_naming_it(tmp_path, template, reason):
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    for value, where in ((template, "the template"), (str(path), f"'{path}'")):
        with pytest.raises(LisaError) as e:
            one_example(tmp_path, chat_template=value)
        line = str(e.value)
        assert line.startswith(f"data.chat_template: {where} does not render") and reason in line, line
        assert "\n" not in line

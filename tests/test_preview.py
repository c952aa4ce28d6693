"""#28: `lisatune data preview CONFIG` prints one tokenized example with the tokens that carry loss marked."""
import json

import pytest
import yaml

from helpers import make_run_assets
from lisatune.cli import main as cli_main

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2?"},
                {"role": "assistant", "content": "Two."}, {"role": "user", "content": "And 3?"},
                {"role": "assistant", "content": "Three."}]
TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2?<|im_end|>\n<|im_start|>assistant\n"
        "{two}\n<|im_start|>user\nAnd 3?<|im_end|>\n<|im_start|>assistant\n[[Three.<|im_end|><|endoftext|>]]\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def config(tmp_path, assets):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": str(assets / "model")},
                                    "data": {"format": "chat", "path": str(data)}}))
    return str(path)


def preview(capsys, *args):
    rc = cli_main(["data", "preview", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_preview_marks_the_tokens_that_carry_loss_and_counts_them(capsys, config):
    rc, out, _ = preview(capsys, config)
    assert rc == 0
    lines = out.splitlines(keepends=True)
    assert lines[0].startswith("training example 0 of 2 (") and "format chat, data.loss_on assistant" in lines[0]
    assert "".join(lines[1:-2]) == TEXT.format(two="[[Two.<|im_end|>]]")
    assert lines[-2].startswith("tokens: ") and ", carrying loss: " in lines[-2]
    n, loss = (int(x.split()[0]) for x in lines[-2].removeprefix("tokens: ").split(", carrying loss: "))
    assert n > loss >= 4  # at least the replies' text, their two end-of-turn tokens and EOS
    assert lines[-1].startswith("training set: 2 examples, ")

    rc, out, _ = preview(capsys, config, "--set", "data.loss_on=last_assistant")
    assert rc == 0 and "".join(out.splitlines(keepends=True)[1:-2]) == TEXT.format(two="Two.<|im_end|>")
    n2, loss2 = (int(x.split()[0]) for x in out.splitlines()[-2].removeprefix("tokens: ").split(", carrying loss: "))
    assert n2 == n and loss2 < loss  # the same tokens, fewer of them trained


def test_preview_of_another_example_and_its_bad_index(capsys, config):
    rc, out, _ = preview(capsys, config, "--index", 1, "--set", "data.loss_on=all")
    assert rc == 0 and out.splitlines()[1] == "[[<|im_start|>user"
    n, loss = (int(x.split()[0]) for x in out.splitlines()[-2].removeprefix("tokens: ").split(", carrying loss: "))
    assert n == loss
    rc, _, err = preview(capsys, config, "--index", 2)
    assert rc == 2 and err == "lisatune: error: --index 2: the training set has 2 examples (0 to 1)\n"
    rc, _, err = preview(capsys, config, "--val")
    assert rc == 2 and err.count("\n") == 1 and "no validation set" in err

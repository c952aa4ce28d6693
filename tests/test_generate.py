"""`lisatune generate`: a streamed completion of --prompt, a chat over stdin, one-line errors."""
import io
import logging

import pytest
import torch
import transformers as T

from helpers import make_run_assets, tiny_tokenizer
from lisatune.cli import main
from lisatune.data import encode_prompt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def cli(capsys):
    """main() in this process -> (exit code, stdout, stderr); the log level it sets is put back."""
    level = logging.getLogger("lisatune").level

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    yield run
    logging.getLogger("lisatune").setLevel(level)


def greedy(model_dir, ids, n):
    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_prompt_prints_the_greedy_completion(assets, cli):
    tok = T.AutoTokenizer.from_pretrained(assets / "model")
    code, out, _ = cli("generate", str(assets / "model"), "--prompt", "What is the sum?", "--max-new-tokens", "12")
    assert code == 0
    assert out == greedy(assets / "model", encode_prompt(tok, "What is the sum?"), 12) + "\n"
    sampled = [cli("generate", str(assets / "model"), "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "1.5",
                   "--seed", "3")[1] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_chat_answers_each_stdin_line_with_the_conversation_so_far(assets, cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Add two and three.\n\nAnd times three?\n"))
    code, out, _ = cli("generate", str(assets / "model"), "--max-new-tokens", "6", "--system", "Be brief.")
    assert code == 0
    tok = T.AutoTokenizer.from_pretrained(assets / "model")
    messages, replies = [{"role": "system", "content": "Be brief."}], []
    for line in ["Add two and three.", "And times three?"]:
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        replies.append(greedy(assets / "model", tok(text, add_special_tokens=False)["input_ids"], 6))
        messages.append({"role": "assistant", "content": replies[-1].strip()})
    assert out == "".join(r + "\n" for r in replies)


def test_bad_options_and_no_chat_template_are_one_line_errors(assets, tmp_path, cli):
    model = str(assets / "model")
    for args, message in [(["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                          (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0")]:
        code, _, err = cli("generate", model, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    base = tmp_path / "base"
    T.AutoModelForCausalLM.from_pretrained(assets / "model").save_pretrained(base)
    tiny_tokenizer(chat=False).save_pretrained(base)
    code, _, err = cli("generate", str(base))
    assert code == 2 and "has no chat template" in err.splitlines()[-1]
    assert cli("generate", str(base), "--prompt", "Add two and three.", "--max-new-tokens", "3")[0] == 0

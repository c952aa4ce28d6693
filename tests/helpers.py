"""What the tests share: tiny models built from configs (no network), a tokenizer, training steps, run assets.

Imported by the tests (`from helpers import ...`); conftest.py holds only pytest's fixtures and hooks.
"""
import json
import os
import tempfile

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lisatune import LisaAdamW
from lisatune.analysis.tiny import ARCHS, tiny_config
from lisatune.data.render import IGNORE
from lisatune.analysis.tiny import tiny_model as _tiny_model

# Everything the suite and its subprocesses put in a temp folder (pytest's tmp_path, torch.multiprocessing's
# error files, torchrun's torchelastic_* folders) goes under one folder, removed when the session ends (conftest).
SYSTEM_TMP = tempfile.gettempdir()
SUITE_TMP = os.environ.get("LISATUNE_SUITE_TMP") or tempfile.mkdtemp(prefix="lisatune-tests-")
os.environ["LISATUNE_SUITE_TMP"] = os.environ["TMPDIR"] = SUITE_TMP  # (subprocesses that import this reuse it)
tempfile.tempdir = None  # read TMPDIR again

torch.set_num_threads(1)  # tiny models: threads only contend on the 2 shared cores

def tiny_model(arch: str = "llama", n_layers: int = 6, seed: int = 0, dtype=torch.float32):
    return _tiny_model(arch, n_layers, seed, dtype).eval()  # no dropout: runs are deterministic


def train(model, opt, data, sched=None, accum=1):
    """Plain training steps on token batches (labels = inputs); returns the losses."""
    losses = []
    for i, x in enumerate(data):
        loss = model(input_ids=x, labels=x).loss
        (loss / accum if accum > 1 else loss).backward()
        losses.append(loss.item())
        if (i + 1) % accum == 0:
            opt.step()
            if sched:
                sched.step()
            opt.zero_grad()
    return losses


def lisa_and_adamw(blocks: int, data, lr=1e-2, weight_decay=0.1, **lisa):
    """Two identical tiny models of `blocks` blocks trained on `data`, one by LisaAdamW(**lisa), one by plain AdamW (decay on
    matrices only); returns (LISA's parameters, AdamW's parameters, the LisaAdamW) for equivalence tests."""
    a, b = tiny_model(n_layers=blocks), tiny_model(n_layers=blocks)
    opt = LisaAdamW(a, lr=lr, weight_decay=weight_decay, **lisa)
    ref = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.ndim >= 2]},
                             {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, weight_decay=weight_decay)
    train(a, opt, data)
    train(b, ref, data)
    return params(a), params(b), opt


def fp32_master_step(masters, ref) -> None:
    """The textbook fp32-master step of optimizer `ref` over the masters of (bf16 weight, fp32 master) pairs:
    cast the bf16 grads into the masters, step, round into the weights."""
    with torch.no_grad():
        for p, m in masters:
            m.grad = p.grad.float()
        ref.step()
        for p, m in masters:
            p.copy_(m)
            p.grad = None


def params(model):
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batches(n: int, seed: int = 0, batch: int = 2, seq: int = 12, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EOS = "<|endoftext|>"  # deliberately not <|im_end|>, so appending EOS is visible


def tiny_tokenizer(chat: bool):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, "<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is the sum of two and three? The answer is five.",
                            "Instruction: write a haiku about the sea. Response: waves."], trainer=trainer)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token="<pad>")
    tok.chat_template = CHATML if chat else None
    return tok


# A whole `lisatune train` run in seconds: a tiny llama + tokenizer saved as a HF directory, and alpaca data.
RECORDS = [{"instruction": f"Add {a} and {b}.", "output": f"The answer is {a + b}."} for a in range(6) for b in range(4)]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on the shared cores


def make_run_assets(root):
    tok = tiny_tokenizer(chat=True)
    cfg = tiny_config("llama", 4)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


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

"""transformers.Trainer and TRL's SFTTrainer with LisaAdamW: accumulation, scheduler, switches, flat optimizer
state, and exact resume from their own checkpoints; the README's TRL example runs."""
import dataclasses
import re
from pathlib import Path

import datasets
import pytest
import torch
import transformers as T
from torch.utils.data import Dataset

from helpers import batches, tiny_model, tiny_tokenizer
from lisatune.analysis.tiny import tiny_config
from lisatune.integrations.hf_trainer import LisaLogCallback, lisa_optimizers

try:
    import trl
except ImportError:  # the TRL tests skip
    trl = None

TOK = tiny_tokenizer(chat=False)
SFT_DATA = [{"prompt": f"What is {a} plus {b}?", "completion": f" The answer is {a + b}."}
            for a in range(6) for b in range(4)]


if trl is not None:
    @dataclasses.dataclass
    class SFTConfigHere(trl.SFTConfig):
        """SFTConfig on this machine: its default bf16 needs a GPU, or use_cpu (module level: the Trainer pickles
        its args)."""
        use_cpu: bool = not torch.cuda.is_available()


class Tokens(Dataset):
    def __init__(self):
        self.x = torch.cat(batches(24, batch=1, seq=12))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def sft_model():
    """A tiny llama over TOK's vocabulary."""
    cfg = tiny_config("llama", 6)
    cfg.vocab_size = len(TOK)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


class Record(T.TrainerCallback):
    """After each optimizer step: the active blocks, the optimizer-state bytes, and the bytes AdamW state of the
    parameters trained in that step takes (two fp32 moments and a step per tensor)."""

    def __init__(self, opt):
        self.opt, self.steps = opt, []

    def on_step_end(self, args, state, control, **kwargs):
        trained = [p for g in self.opt.param_groups for p in g["params"]]
        self.steps.append({"active": tuple(self.opt.active_layers), "state": self.opt.state_bytes(),
                           "bound": sum(8 * p.numel() + 4 for p in trained)})


def run(out, resume=None, trainer="hf"):
    common = dict(max_steps=12, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                  lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps", save_steps=5, logging_steps=1,
                  report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    if trainer == "trl":
        if trl is None:
            pytest.skip("trl is not installed")
        model, args = sft_model(), trl.SFTConfig(out, max_length=64, **common)
        make = lambda **kw: trl.SFTTrainer(train_dataset=datasets.Dataset.from_list(SFT_DATA),  # noqa: E731
                                           processing_class=TOK, **kw)
    else:
        model, args = tiny_model(), T.TrainingArguments(out, **common)
        make = lambda **kw: T.Trainer(train_dataset=Tokens(), **kw)  # noqa: E731
    opt, sched = lisa_optimizers(model, args, n_layers=2, interval=3)
    logs, record = [], Record(opt)
    grab = type("Grab", (T.TrainerCallback,), {"on_log": lambda s, a, st, c, logs=None, **k: logs and
                                                   grabbed.append(dict(logs))})()
    grabbed = logs
    make(model=model, args=args, optimizers=(opt, sched), callbacks=[LisaLogCallback(opt), record, grab]).train(
        resume_from_checkpoint=resume)
    return model, opt, logs, record.steps


@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_trainer_switches_keeps_state_flat_and_resumes_bitwise(tmp_path, trainer):
    m1, o1, logs, steps = run(tmp_path / "a", trainer=trainer)
    run(tmp_path / "b", trainer=trainer)
    m3, o3, _, _ = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-5"), trainer=trainer)  # mid-interval
    assert o1.steps_done == o3.steps_done == 12
    assert [h["step"] for h in o1.history] == [0, 3, 6, 9, 12]  # switches at optimizer steps, not micro-batches
    assert len({h["active"] for h in steps}) > 1  # blocks switch
    # Flat: never more state than AdamW of the trained set, far below full AdamW's, however many blocks took turns
    assert all(0 < h["state"] <= h["bound"] for h in steps)
    assert max(h["state"] for h in steps) < 0.6 * 8 * sum(p.numel() for p in m1.parameters())
    assert o1.history == o3.history
    for (n, p), q in zip(m1.named_parameters(), m3.parameters()):
        assert torch.equal(p, q), n
    assert any("lisa_active" in entry for entry in logs)
    lrs = [entry["learning_rate"] for entry in logs if "learning_rate" in entry]
    assert lrs[1] > lrs[-1] > 0  # the Trainer's cosine schedule drives LisaAdamW


def test_the_readme_trl_example_trains_with_lisa(tmp_path, monkeypatch):
    if trl is None:
        pytest.skip("trl is not installed")
    monkeypatch.setattr(trl, "SFTConfig", SFTConfigHere)  # what the example's `from trl import` gets
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "SFTTrainer(" in b)
    monkeypatch.chdir(tmp_path)  # its output_dir, runs/sft, lands here
    scope = {"model": sft_model(), "tokenizer": TOK, "dataset": datasets.Dataset.from_list(SFT_DATA)}
    exec(example, scope)
    trainer, optimizer = scope["trainer"], scope["optimizer"]
    assert trainer.optimizer.optimizer is optimizer and optimizer.steps_done == trainer.state.global_step > 0
    assert not all(torch.equal(p, q) for p, q in zip(scope["model"].parameters(), sft_model().parameters()))

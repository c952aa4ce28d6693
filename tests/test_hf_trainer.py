"""transformers.Trainer with LisaAdamW: accumulation, scheduler, and exact resume from its own checkpoints."""
import torch
import transformers as T
from torch.utils.data import Dataset

from conftest import batches, tiny_model
from lisatune.integrations.hf_trainer import LisaLogCallback, lisa_optimizers


class Tokens(Dataset):
    def __init__(self):
        self.x = torch.cat(batches(24, batch=1, seq=12))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def run(out, resume=None):
    model = tiny_model()
    args = T.TrainingArguments(
        out, max_steps=12, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps", save_steps=5, logging_steps=1,
        report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    opt, sched = lisa_optimizers(model, args, n_layers=2, interval=3)
    logs = []
    cb = LisaLogCallback(opt)
    trainer = T.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched), callbacks=[cb])
    trainer.add_callback(type("Grab", (T.TrainerCallback,), {"on_log": lambda s, a, st, c, logs=None, **k: logs and
                                                             logs_list.append(dict(logs))})())
    logs_list = logs
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, logs


def test_trainer_resume_from_checkpoint_is_bitwise_equal(tmp_path):
    m1, o1, logs = run(tmp_path / "a")
    run(tmp_path / "b")
    m3, o3, _ = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-5"))
    assert o1.steps_done == o3.steps_done == 12
    assert [h["step"] for h in o1.history] == [0, 3, 6, 9, 12]  # switches at optimizer steps, not micro-batches
    assert o1.history == o3.history
    for (n, p), q in zip(m1.named_parameters(), m3.parameters()):
        assert torch.equal(p, q), n
    assert any("lisa_active" in entry for entry in logs)
    lrs = [entry["learning_rate"] for entry in logs if "learning_rate" in entry]
    assert lrs[1] > lrs[-1] > 0  # the Trainer's cosine schedule drives LisaAdamW

"""The fine-tuning recipe: one loop for every method, readable top to bottom.

config -> model -> data -> method (model, optimizer) -> loop -> checkpoints -> final model.
The loop never asks which method it runs; the method object answers for it. Under torchrun or
accelerate launch (config `distributed: ddp | fsdp`) the same loop runs on every rank: each takes its
slice of one global batch, and the few places where ranks must agree go through lisatune.distributed.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .allocator import release_freed_memory
from .checkpoint import latest_checkpoint
from .data import collate, gsm_eval_items, load_splits
from .data.render import IGNORE
from .distributed import (all_sum, full_model, is_dtensor, launch_mode, load_run_checkpoint, no_sync, on_rank0,
                          save_run_checkpoint, wrap_for)
from .errors import LisaError
from .evaluate import eval_loss, gsm_accuracy
from .loss import pick_loss, standard_loss
from .methods import build_method
from .metrics import Metrics
from .models import load_model, save_model
from .train_config import TrainConfig

log = logging.getLogger("lisatune")

# Changing these does not change what a resumed run computes.
RESUME_FREE = {"resume", "overwrite", "log_every", "tensorboard", "eval_every", "save_every", "keep_last",
               "release_memory"}


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries (a second Ctrl-C aborts)."""

    def __enter__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def batch_indices(n_examples: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Example indices of micro-batch `micro_step`: a pure function, so resume needs no data state."""
    per_epoch = n_examples // batch_size
    epoch, j = divmod(micro_step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[j * batch_size:(j + 1) * batch_size].tolist()


def lr_schedule(optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine or linear decay to 0 at `total`, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return {"cosine": 0.5 * (1 + math.cos(math.pi * done)), "linear": 1 - done, "constant": 1.0}[kind]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_run_dir(cfg: TrainConfig) -> Path | None:
    """Create the run directory, or find the checkpoint to resume; refuse to clobber another run."""
    t = cfg.train
    out = Path(t.output_dir)
    saved = out / "config.yaml"
    if out.exists() and any(out.iterdir()):
        ckpt = latest_checkpoint(out)
        if t.resume and ckpt is not None:
            _check_same_run(cfg, saved)
            return ckpt
        if t.resume is True:
            raise LisaError(f"--resume: output_dir '{out}' has no complete checkpoint to resume from")
        if not t.overwrite:
            raise LisaError(f"output_dir '{out}' holds another run; pass --overwrite to replace it "
                            "or --resume to continue it")
        shutil.rmtree(out)
    elif t.resume is True:
        raise LisaError(f"--resume: output_dir '{out}' has no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return None


def _check_same_run(cfg: TrainConfig, saved: Path) -> None:
    if not saved.is_file():
        return
    old, new = _flat(yaml.safe_load(saved.read_text())), _flat(cfg.model_dump(mode="json"))
    default = _flat(TrainConfig().model_dump(mode="json"))  # a key added since that run was saved: its default
    for key in sorted(set(old) | set(new)):
        if key.startswith("train.") and key[len("train."):] in RESUME_FREE:
            continue
        if old.get(key, default.get(key)) != new.get(key):
            raise LisaError(f"cannot resume {saved.parent}: {key} was {old.get(key)!r}, now {new.get(key)!r} "
                            "(use a new output_dir for a different run)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(cfg: TrainConfig) -> dict:
    # From the first line: a signal while the model loads or the first eval runs is a clean stop too.
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopRequest) -> dict:
    t = cfg.train
    if t.release_memory:
        release_freed_memory()
    run = Path(t.output_dir)
    set_seed(t.seed)
    # Under torchrun / accelerate launch this joins the process group (gloo on CPU, NCCL on GPUs).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if rank:
        logging.getLogger("lisatune").setLevel(logging.WARNING)  # rank 0 reports
    mode = launch_mode(cfg.distributed, world)  # none | ddp | fsdp; refuses several processes with "none"
    resume_from, finished = on_rank0(lambda: _start(cfg))  # only rank 0 touches the run directory
    if finished is not None:
        return finished

    # Model, data, method.
    model, tokenizer = load_model(cfg.model)
    train_set, val_set = load_splits(cfg.data, tokenizer)
    global_batch = t.batch_size * world  # train.batch_size is per process
    if len(train_set) < global_batch:
        raise LisaError(f"data: {len(train_set)} training examples, fewer than train.batch_size={t.batch_size}"
                        + (f" × {world} processes" if world > 1 else ""))
    gsm_items = gsm_eval_items(cfg.data)[: t.gsm_eval_samples] if cfg.data.format == "gsm" else []
    method = build_method(cfg.method, cfg.method_options())
    model = method.prepare(model).to(accelerator.device)
    # `forward` is what training calls: the model, or its DDP wrapper; FSDP2 shards `model` in place.
    forward, optimizer = wrap_for(mode, model, lambda m: method.optimizer(m, t.lr, t.weight_decay, t.betas, t.eps))
    per_epoch = len(train_set) // global_batch // t.grad_accum
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    scheduler = lr_schedule(optimizer, t.schedule, t.warmup_steps, total)
    pad_id = tokenizer.pad_token_id
    # Head + cross-entropy in chunks (no full logits) when the head is not sharded and the fused loss checks out.
    probe = {k: v.to(accelerator.device) for k, v in collate([train_set[i] for i in range(min(2, len(train_set)))], pad_id).items()}
    loss_fn = pick_loss(forward, probe, t.fused_loss and mode != "fsdp")
    if all_sum(loss_fn is standard_loss)[0]:  # every rank computes the same way
        loss_fn = standard_loss

    step, first_eval = 0, None
    if resume_from is not None:
        state = load_run_checkpoint(resume_from, model, optimizer, scheduler)
        step, first_eval = state["step"], state.get("first_eval")
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = Metrics(run, t.tensorboard, resume_step=step if resume_from else None) if rank == 0 else NoMetrics()

    def evaluate(at: int) -> dict:  # every rank evaluates (FSDP2 needs all of them in each forward)
        res = eval_loss(model, val_set, pad_id, t.eval_batch_size, loss_fn) if val_set else {}
        if gsm_items:
            acc = gsm_accuracy(model, tokenizer, gsm_items, t.gsm_max_new_tokens, t.eval_batch_size)
            res |= {k: v for k, v in acc.items() if k != "samples"}
            if rank == 0:
                (run / f"gsm_samples_step{at}.json").write_text(json.dumps(acc["samples"], indent=1))
        metrics.write(at, **res)
        return res

    def checkpoint(at: int) -> Path:  # collective under ddp/fsdp; rank 0 writes
        extra = {"first_eval": first_eval, "micro_step": at * t.grad_accum}
        return save_run_checkpoint(run, at, model, optimizer, scheduler, extra, keep_last=t.keep_last)

    if first_eval is None:
        first_eval = evaluate(0)
        log.info("before training: %s", _fmt(first_eval))

    if all_sum(stop.requested)[0]:  # stopped before the first step: keep the first eval
        raise Interrupted(step, checkpoint(step))

    # The loop.
    model.train()
    started, tokens_seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc=f"{cfg.method}", disable=not accelerator.is_main_process)
    while step < total:
        tick, tokens, loss_sum = time.perf_counter(), 0, 0.0
        for micro in range(t.grad_accum):
            # Every rank draws the same global batch and takes its slice of it.
            idx = batch_indices(len(train_set), global_batch, t.seed, step * t.grad_accum + micro)[rank::world]
            batch = {k: v.to(accelerator.device) for k, v in collate([train_set[i] for i in idx], pad_id).items()}
            with no_sync(forward, skip=micro < t.grad_accum - 1):  # accumulate locally, reduce at the last
                loss = loss_fn(forward, **batch)
                n_labels = int((batch["labels"][:, 1:] != IGNORE).sum())  # the tokens this loss averages
                n_global, non_finite = all_sum(n_labels, not torch.isfinite(loss))  # all ranks agree
                if non_finite:
                    _non_finite(run, step + 1, "loss")
                # This rank's share of the global batch's labelled tokens, × world because DDP/FSDP average
                # the ranks' gradients: the gradient is the global batch's mean-loss gradient (× 1 in one process).
                loss = loss * (world * n_labels / n_global) / t.grad_accum
                accelerator.backward(loss)
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        trainable = [p for p in model.parameters() if p.requires_grad]  # LISA changes it at switches
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if is_dtensor(grad_norm) else grad_norm)  # same on all ranks
        if not math.isfinite(grad_norm):
            _non_finite(run, step + 1, "gradient norm")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, tokens, stopping = all_sum(loss_sum, tokens, stop.requested)  # a signal on any rank stops all
        loss_sum /= world
        tokens_seen += tokens

        dt = time.perf_counter() - tick
        status = method.status(optimizer)
        row = {"loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_s": tokens / dt, "step_s": dt, **status}
        if step % t.log_every == 0 or step == total:
            metrics.write(step, **row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens / dt:.0f}",
                        **({"active": status["active"]} if "active" in status else {}))
        bar.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < total:
            evaluate(step)
        if t.save_every and step % t.save_every == 0 and step < total:
            checkpoint(step)
        if stopping:
            bar.close()
            raise Interrupted(step, checkpoint(step))
    bar.close()

    last_eval = evaluate(step)
    elapsed = time.perf_counter() - started
    checkpoint(step)
    full = full_model(model)  # collective under FSDP2: the gathered weights, on rank 0
    final_dir = on_rank0(lambda: save_model(method.export(full, merge=t.merge_lora), tokenizer, run / "final"))

    def write_summary() -> dict:
        losses = [r["loss"] for r in map(json.loads, metrics.path.read_text().splitlines()) if "loss" in r]
        summary = {"method": cfg.method, "model": cfg.model.source, "steps": step, "distributed": mode,
                   "processes": world, "loss": "model" if loss_fn is standard_loss else "fused", "train_seconds": round(elapsed, 1),
                   "train_loss_first": sum(losses[:5]) / max(1, len(losses[:5])),
                   "train_loss_last": sum(losses[-5:]) / max(1, len(losses[-5:])),
                   "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                   "before": first_eval, "after": last_eval, "final_model": str(final_dir),
                   "metrics": str(run / "metrics.jsonl")}
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    summary = on_rank0(write_summary)  # every rank returns it (the last collective: ranks leave together)
    metrics.close()
    return summary


def _start(cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """Rank 0: prepare the run directory; (checkpoint to resume, the summary if that run already finished)."""
    run = Path(cfg.train.output_dir)
    resume_from = prepare_run_dir(cfg)
    if resume_from is not None and (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        if summary.get("steps") == json.loads((resume_from / "trainer_state.json").read_text())["step"]:
            log.info("run in %s is already complete; nothing to do", run)
            return resume_from, {**summary, "already_complete": True}
    return resume_from, None


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _non_finite(run: Path, step: int, what: str):
    last = latest_checkpoint(run)
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
    raise LisaError(f"non-finite {what} at step {step}: stopped before updating the weights; {kept}")


def _fmt(res: dict) -> str:
    parts = []
    if "eval_loss" in res:
        parts.append(f"eval loss {res['eval_loss']:.4f}")
    if "gsm_total" in res:
        parts.append(f"GSM exact match {res['gsm_correct']}/{res['gsm_total']}")
    return ", ".join(parts) or "no validation data"

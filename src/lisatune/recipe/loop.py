"""The fine-tuning recipe: one loop for every method, readable top to bottom.

config -> run directory -> model -> data -> method (model, optimizer) -> loop -> checkpoints -> final model.
The loop never asks which method it runs; the method object answers for it. Under torchrun or
accelerate launch (config `distributed: ddp | fsdp`) the same loop runs on every rank: each takes its
slice of one global batch, and the few places where ranks must agree go through lisatune.distributed.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from ..data import collate, data_fingerprint, gsm_eval_items, load_splits
from .meter import PhaseMemory
from ..data.render import IGNORE
from ..distributed import (all_sum, full_model, is_dtensor, launch_mode, no_sync, on_rank0, prepare_model,
                           wrap_model)
from ..distributed.launch import BACKENDS
from ..errors import LisaError, first_line
from ..integrations import harness
from ..methods import METHODS, Method
from ..schema import os_reason
from .allocator import release_freed_memory
from .checkpoint import checkpoint_step, last_good_checkpoint, load_checkpoint, save_checkpoint, stream
from .config import TrainConfig
from .evaluate import eval_loss, gsm_accuracy
from .host_memory import check_host_ram
from .loss import pick_loss, standard_loss
from .metrics import Metrics, NoMetrics, check_sinks
from .models import check_positions, load_model, save_model
from .packing import check_packing
from .progress import bar, console
from .run_dir import create_run_dir, describe_eval, start, write_summary

log = logging.getLogger("lisatune")


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


def lr_schedule(optimizer, kind: str, warmup: int, total: int,
                min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine or linear decay to min_ratio × the lr at `total`, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * done)), "linear": 1 - done, "constant": 1.0}[kind]
        return decay if kind == "constant" or not min_ratio else min_ratio + (1 - min_ratio) * decay
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Run:
    """Everything one training run holds, set up once by `setup` and advanced by `train_step`."""
    cfg: TrainConfig
    dir: Path
    device: torch.device
    world: int
    rank: int
    mode: str  # none | ddp | fsdp
    model: torch.nn.Module  # evaluated, checkpointed and saved (sharded in place under FSDP2)
    forward: torch.nn.Module  # what training calls: the model, or its DDP wrapper
    tokenizer: Any
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: list[dict]
    val_set: list[dict]
    gsm_items: list[dict]
    loss_fn: Callable
    total: int  # optimizer steps
    step: int = 0
    start_step: int = 0  # the step this process started (or resumed) at: before it, no update of ours
    first_eval: dict | None = None
    last_eval: dict | None = None  # the final evaluation, once done (kept in the final checkpoint)
    best: dict | None = None  # train.keep_best: {"step", "eval_loss"} of the model in best/
    fingerprint: dict | None = None  # data_fingerprint of the training data, stored in every checkpoint
    metrics: Any = None
    flat: bool = False  # packed sequences go as one row per batch (flash attention; see recipe/packing.py)
    memory: PhaseMemory | None = None  # peak memory per phase and per logging interval
    tokens_seen: int = 0
    eval_seconds: float = 0.0  # every evaluation of this process, kept out of train_seconds
    extra: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.world  # train.batch_size is per process

    def batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, self.device, self.flat)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume, or report the finished) training run `cfg`; returns its summary."""
    # From the first line: a signal while the model loads or the first eval runs is a clean stop too.
    with StopRequest() as stop, console():
        run = setup(cfg)
        if isinstance(run, dict):
            return run  # that run is already complete
        if run.first_eval is None and cfg.train.eval_before:
            run.first_eval = evaluate(run, 0)
            log.info("before training: %s", describe_eval(run.first_eval))
        if all_sum(stop.requested)[0]:  # stopped before the first step: keep the first eval
            raise Interrupted(run.step, checkpoint(run))

        run.model.train()
        started, evals_before = time.perf_counter(), run.eval_seconds
        with bar(run.total, cfg.method, initial=run.step) as steps:
            while run.step < run.total:
                row, stopping = train_step(run, stop)
                t = cfg.train
                if run.step % t.log_every == 0 or run.step == run.total:
                    run.metrics.write(run.step, **row, **run.memory.interval())  # peaks since the last row
                steps.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                  **({"lr_eh": f"{row['lr_embed_head']:.2e}"} if "lr_embed_head" in row else {}),
                                  tok_s=f"{row['tokens_per_s']:.0f}",
                                  **({"active": row["active"]} if "active" in row else {}))
                steps.update(1)
                if t.eval_every and run.step % t.eval_every == 0 and run.step < run.total:
                    evaluate(run, run.step)
                if t.save_every and run.step % t.save_every == 0 and run.step < run.total:
                    checkpoint(run)
                if stopping:
                    steps.close()
                    raise Interrupted(run.step, checkpoint(run))
        return finish(run, elapsed=time.perf_counter() - started - (run.eval_seconds - evals_before))


# -- setup --------------------------------------------------------------------------------------------
def setup(cfg: TrainConfig) -> Run | dict:
    """Processes, run directory, model, data, method, optimizer, schedule, loss, checkpoint: in that order."""
    t = cfg.train
    if t.release_memory:
        release_freed_memory()
    set_seed(t.seed)
    # Under torchrun / accelerate launch this joins the process group (gloo on CPU, NCCL on GPUs).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout))])
    world, rank = accelerator.num_processes, accelerator.process_index
    if rank:
        logging.getLogger("lisatune").setLevel(logging.WARNING)  # rank 0 reports
    mode = launch_mode(cfg.distributed, world)  # none | ddp | fsdp; refuses several processes with "none"
    fingerprint = data_fingerprint(cfg.data)  # the content trained on: a resume must train on the same
    resume_from, finished = on_rank0(lambda: start(cfg, fingerprint))  # only rank 0 touches the run directory
    if finished is not None:
        return finished
    check_sinks(t.sinks())  # what is not installed is found before the model loads, not after
    if t.eval_tasks:  # an unknown task too, not at the first evaluation
        on_rank0(lambda: harness.task_manager(t.eval_tasks, t.eval_include_path, where="train.eval_tasks",
                                              option="train.eval_include_path", **task_code(t)))

    mixed = t.precision == "bf16-mixed"
    use_tf32(accelerator.device, t)
    model, tokenizer = load_model(cfg.model.model_copy(update={"dtype": "bf16"}) if mixed else cfg.model)
    train_set, val_set = load_splits(cfg.data, tokenizer)
    check_positions(model, train_set + val_set, cfg.data.max_length, "data.max_length")
    if len(train_set) < t.batch_size * world:
        raise LisaError(f"data: {len(train_set)} {'packed sequences' if cfg.data.packing else 'training examples'}, "
                        f"fewer than train.batch_size={t.batch_size}" + (f" × {world} processes" if world > 1 else ""))
    gsm_items = gsm_eval_items(cfg.data)[: t.gsm_eval_samples] if cfg.data.format == "gsm" else []

    per_epoch = len(train_set) // (t.batch_size * world) // t.grad_accum
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    # before anything is copied on the host; decided once (rank 0), so no rank is left waiting for one refused
    on_rank0(lambda: check_host_ram(cfg, model, total, resumed=resume_from is not None))
    method = METHODS[cfg.method](cfg.method_options(), t)  # its typed section and the train options, as they are
    model = method.prepare(model, device=accelerator.device if mode == "none" else None)
    if mode != "none":  # ddp/fsdp: on the device (fsdp: sharded) before the optimizer exists
        model = prepare_model(mode, model.to(accelerator.device))
    # One process: the method moves the model as it builds the optimizer (LISA quantizes frozen blocks onto the
    # device first, so the model is never whole there in full precision).
    if resume_from is not None:  # the active set drawn at construction is not the run's: the resume line says it
        log.addFilter(no_switch_log)
    try:
        optimizer = method.optimizer(model, master_weights=mixed, device=accelerator.device if mode == "none" else None)
    finally:
        log.removeFilter(no_switch_log)
    # After the optimizer has frozen what it does not train: FSDP2 sets itself up at its first forward (this
    # probe's), and a probe before LISA's freezing made its packed runs train differently from one process.
    flat = check_packing(model) if cfg.data.packing else False  # every rank: a forward under FSDP is collective
    forward = wrap_model(mode, model, optimizer)  # ddp: the wrapper (after LISA has frozen the model)
    schedule = lr_schedule(optimizer, t.schedule, t.warmup(total), total, t.min_lr_ratio)
    run = Run(cfg, Path(t.output_dir), accelerator.device, world, rank, mode, model, forward, tokenizer, method,
              optimizer, schedule, train_set, val_set, gsm_items, standard_loss, total)
    run.flat = flat
    run.loss_fn = choose_loss(run)
    run.fingerprint = fingerprint
    run.memory = PhaseMemory(accelerator.device, optimizer)

    if resume_from is not None:
        claimed = on_rank0(lambda: checkpoint_step(resume_from))
        if claimed > total:
            raise LisaError(f"checkpoint '{resume_from}' claims step {claimed}, beyond this run's {total} steps: "
                            "it is not a checkpoint of this run")
        state = load_checkpoint(resume_from, run.model, run.optimizer, run.scheduler)
        run.step, run.first_eval, run.best = state["step"], state.get("first_eval"), state.get("best")
        run.start_step = run.step
        if run.step == total:  # killed after the final checkpoint: its evaluation is done and in the metrics
            run.last_eval = state.get("last_eval")
        active = method.status(optimizer).get("active")
        log.info("resumed from %s at step %d of %d%s", resume_from, run.step, total,
                 f", active blocks {active}" if active else "")
    else:  # set up: only now is a new run's directory made (and a previous run it replaces deleted)
        on_rank0(lambda: create_run_dir(cfg))
    run.metrics = Metrics(run.dir, t.sinks(), resume_step=run.step if resume_from else None,
                          config=cfg.model_dump(mode="json")) if rank == 0 else NoMetrics()
    return run


def use_tf32(device: torch.device, t) -> bool:
    """fp32 runs on CUDA multiply on TF32 tensor cores (train.tf32, on by default), as torch's own fp32 default does
    not: about 10 bits of mantissa in the products, accumulated in fp32, several times the fp32 matmul speed.
    Whether it was turned on."""
    on = device.type == "cuda" and t.precision == "fp32" and t.tf32
    if on:
        torch.set_float32_matmul_precision("high")  # sets torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
    return on


def choose_loss(run: Run) -> Callable:
    """Head + cross-entropy in chunks (no full logits) when the head is not sharded and the fused loss checks
    out on a real batch; else the model's own. Every rank computes the same way."""
    probe = run.batch([run.train_set[i] for i in range(min(2, len(run.train_set)))])
    loss_fn = pick_loss(run.forward, probe, run.cfg.train.fused_loss and BACKENDS[run.mode].fused_loss)
    return standard_loss if all_sum(loss_fn is standard_loss)[0] else loss_fn


# -- one optimizer step -------------------------------------------------------------------------------
def train_step(run: Run, stop: StopRequest) -> tuple[dict, bool]:
    """Accumulate gradients over the micro-batches, clip, step; (metrics row, whether to stop now)."""
    t = run.cfg.train
    tick, tokens, loss_sum = time.perf_counter(), 0, 0.0
    for micro in range(t.grad_accum):
        # Every rank draws the same global batch and takes its slice of it.
        idx = batch_indices(len(run.train_set), run.global_batch, t.seed, run.step * t.grad_accum + micro)
        examples = [run.train_set[i] for i in idx[run.rank::run.world]]
        batch = run.batch(examples)
        with no_sync(run.forward, skip=micro < t.grad_accum - 1):  # accumulate locally, reduce at the last
            with run.memory.phase("forward"):
                loss = run.loss_fn(run.forward, **batch)
            n_labels = int((batch["labels"][:, 1:] != IGNORE).sum())  # the tokens this loss averages
            n_global, non_finite = all_sum(n_labels, not torch.isfinite(loss))  # all ranks agree
            if non_finite:
                non_finite_stop(run, "loss")
            # This rank's share of the global batch's labelled tokens, × world because DDP/FSDP average
            # the ranks' gradients: the gradient is the global batch's mean-loss gradient (× 1 in one process).
            loss = loss * (run.world * n_labels / n_global) / t.grad_accum
            with run.memory.phase("backward"):
                loss.backward()
        loss_sum += loss.item()
        tokens += sum(len(e["input_ids"]) for e in examples)  # not padding
    with run.memory.phase("step"):  # clipping, the update, the schedule; LISA's switch at its end is "switch"
        trainable = [p for p in run.model.parameters() if p.requires_grad]  # LISA changes it at switches
        clip = t.max_grad_norm if t.max_grad_norm is not None else float("inf")  # None: no clipping (only)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
        grad_norm = float(grad_norm.full_tensor() if is_dtensor(grad_norm) else grad_norm)  # same on all ranks
        if not math.isfinite(grad_norm):
            non_finite_stop(run, "gradient norm")
        trained = run.method.status(run.optimizer)  # LISA's active set of this step: a switch may follow it
        if run.step + 1 == run.total:
            log.addFilter(no_switch_log)  # the engine's switch after the last step trains nothing: not shown
        try:
            run.optimizer.step()
        finally:
            log.removeFilter(no_switch_log)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss_sum, tokens, stopping = all_sum(loss_sum, tokens, stop.requested)  # a signal on any rank stops all
    run.tokens_seen += tokens
    dt = time.perf_counter() - tick
    row = {"loss": loss_sum / run.world, **lr_row(run), "grad_norm": grad_norm,
           "tokens_per_s": tokens / dt, "step_s": dt, **run.method.status(run.optimizer),
           **({"active": trained["active"]} if "active" in trained else {})}
    return row, bool(stopping)


def lr_row(run: Run) -> dict:
    """`lr`: train.lr after the schedule (the lr of the blocks / every group the method steps at train.lr), never
    that of a group the method scales; `lr_embed_head`: the lr of the groups at another one (LISA's always-on
    embedding, head and norms at lisa.embed_head_lr × lr), present only when there are such groups.
    Every group's lr is its own initial lr × the schedule's one factor, so the method's layout does not matter."""
    now, base, lr = run.scheduler.get_last_lr(), run.scheduler.base_lrs, run.cfg.train.lr
    row = {"lr": lr * now[0] / base[0]}
    scaled = [n for n, b in zip(now, base) if not math.isclose(b, lr, rel_tol=1e-9)]
    if scaled:
        row["lr_embed_head"] = scaled[0]
    return row


def no_switch_log(record: logging.LogRecord) -> bool:
    """A log filter dropping LisaOptimizer's switch line. Its checkpoints pair step s with the active set
    sampled for s // K, so it samples at every K-th step, the last one too; the recipe hides that one."""
    return not hasattr(record, "lisa_switch")  # the engine tags its switch line so


def lr_cause(run: Run) -> str:
    """Why a value went non-finite. Before this process's first update the weights are the loaded (finite)
    ones, so the lr cannot be the cause; after it, the updates (whose size the lr sets) are."""
    if run.step == run.start_step:
        return "before any update of this run, so not the lr: the model's weights or the data give it"
    t = run.cfg.train
    now = lr_row(run)["lr"]
    clip = "" if t.max_grad_norm is not None else " or clip with train.max_grad_norm"
    eh = getattr(run.cfg.method_options(), "embed_head_lr", None)
    if eh is not None and eh > 1:  # the embedding and head step at a multiple of train.lr: that is the lever
        return (f"the updates diverged at train.lr={t.lr:g} × lisa.embed_head_lr={eh:g} for the embedding and "
                f"head: lower lisa.embed_head_lr (or train.lr){clip}")
    return f"the updates diverged at train.lr={t.lr:g} (now {now:.3g}): lower train.lr{clip}"


def kept_checkpoint(run: Run) -> str:
    last = on_rank0(lambda: last_good_checkpoint(run.dir))  # good: complete, and every weight in it finite
    return f"the last good checkpoint {last} is intact" if last else "no good checkpoint was written"


def non_finite_stop(run: Run, what: str):
    raise LisaError(f"non-finite {what} at step {run.step + 1}: {lr_cause(run)}; stopped before updating the "
                    f"weights; {kept_checkpoint(run)}")


def weights_finite(model: torch.nn.Module) -> bool:
    """Every trainable parameter finite, on every rank (each checks its own shards under FSDP2)."""
    bad = any(not bool(torch.isfinite(p.to_local() if is_dtensor(p) else p).all())
              for p in model.parameters() if p.requires_grad)
    return all_sum(bad)[0] == 0


# -- evaluation, checkpoints, the end -------------------------------------------------------------------
def evaluate(run: Run, at: int) -> dict:
    """Held-out loss (GSM exact match, lm-eval tasks), written to the metrics. Every rank evaluates (FSDP2 needs
    all), but lm-eval only on rank 0 (its model is the whole model: not under FSDP2)."""
    t = run.cfg.train
    tick = time.perf_counter()
    res = eval_loss(run.model, run.val_set, run.tokenizer.pad_token_id, t.eval_batch_size, run.loss_fn, run.flat) \
        if run.val_set else {}
    if run.gsm_items:
        acc = gsm_accuracy(run.model, run.tokenizer, run.gsm_items, t.gsm_max_new_tokens, t.eval_batch_size)
        res |= {k: v for k, v in acc.items() if k != "samples"}
        if run.rank == 0:
            f = run.dir / f"gsm_samples_step{at}.json"
            try:
                f.write_text(json.dumps(acc["samples"], indent=1))
            except OSError as e:
                raise LisaError(f"cannot write {f} ({os_reason(e)})") from None
    if t.eval_tasks:
        res |= on_rank0(lambda: harness.run_tasks(
            run.model, run.tokenizer, t.eval_tasks, t.eval_include_path, limit=t.eval_limit,
            batch_size=t.eval_batch_size, data=run.cfg.data, progress=False, where="train.eval_tasks",
            option="train.eval_include_path", **task_code(t)))
    run.metrics.write(at, **res)
    if t.keep_best and at > 0 and "eval_loss" in res and (run.best is None or res["eval_loss"] < run.best["eval_loss"]):
        keep_best(run, at, res["eval_loss"])
    run.eval_seconds += time.perf_counter() - tick
    return res


def save_run_model(run: Run, name: str, hint: str = "") -> Path:
    """Collective: the run's model (the method's export) as a Hugging Face directory <output_dir>/<name>, written
    by rank 0. Under FSDP2 the weights go to files as they are gathered, one tensor at a time (rank 0 never holds
    the whole model on its host; FSDP2 trains full or LISA, whose export is the model itself)."""
    out = run.dir / name
    staged = stream(run.model, run.dir, name) if run.mode == "fsdp" else None
    full = full_model(run.model) if staged is None else None  # the model itself, on rank 0

    def save() -> Path:
        try:
            if staged is None:
                return save_model(run.method.export(full, merge=run.cfg.train.merge_lora), run.tokenizer, out)
            try:
                return save_model(run.model, run.tokenizer, out, staged=staged)
            finally:
                staged.discard()  # (also when save_model refused the directory before moving anything)
        except LisaError:
            raise
        except Exception as e:  # a full disk, a read-only folder, safetensors' own error
            reason = os_reason(e) if isinstance(e, OSError) else first_line(e)
            raise LisaError(f"cannot save the {name} model to {out} ({reason}){hint}") from None

    return on_rank0(save)


def keep_best(run: Run, at: int, loss: float) -> None:
    """The model of the evaluation at step `at` into <output_dir>/best (atomically replacing the previous best);
    its step and loss travel in the checkpoints, so a resumed run compares with it."""
    save_run_model(run, "best")
    run.best = {"step": at, "eval_loss": loss}
    log.info("best eval_loss so far (%.4f at step %d): model saved to %s", loss, at, run.dir / "best")


def task_code(t) -> dict:
    """Whether lm-eval task files may run their `!function` code: the run's opt-in, and its name in errors."""
    return {"allow_code": t.eval_allow_task_code, "code_option": "train.eval_allow_task_code: true"}


def checkpoint(run: Run) -> Path:
    """Collective under ddp/fsdp; rank 0 writes. Never from non-finite weights: a checkpoint is a good one."""
    if not weights_finite(run.model):
        raise LisaError(f"non-finite weights at step {run.step}: not checkpointed; {lr_cause(run)}; "
                        f"{kept_checkpoint(run)}")
    extra = {"first_eval": run.first_eval, "micro_step": run.step * run.cfg.train.grad_accum,
             "data_fingerprint": run.fingerprint, **({"last_eval": run.last_eval} if run.last_eval else {}),
             **({"best": run.best} if run.best else {})}
    return save_checkpoint(run.dir, run.step, run.model, run.optimizer, run.scheduler, extra,
                           keep_last=run.cfg.train.keep_last, tokenizer=run.tokenizer)


def finish(run: Run, elapsed: float) -> dict:
    """The last evaluation and checkpoint, the final model and summary.json; returns the summary."""
    cfg = run.cfg
    if run.last_eval is None:  # else: resumed from the final checkpoint, whose evaluation is in the metrics
        run.last_eval = evaluate(run, run.step)
        if cfg.train.save_final_state:  # false: only the model below; summary.json then marks the run complete
            checkpoint(run)
    last_eval = run.last_eval
    final_dir = save_run_model(run, "final", "; the final checkpoint is intact: run again with --resume to save it")
    summary = {"method": cfg.method, "model": cfg.model.source, "steps": run.step, "distributed": run.mode,
               "processes": run.world, "loss": "model" if run.loss_fn is standard_loss else "fused",
               "train_seconds": round(elapsed, 1), "eval_seconds": round(run.eval_seconds, 1),
               "tokens_per_s": round(run.tokens_seen / max(elapsed, 1e-9), 1),
               "memory": run.memory.summary(),  # this process's peaks (MiB); CUDA: per phase too
               "before": run.first_eval, "after": last_eval, "final_model": str(final_dir),
               "metrics": str(run.dir / "metrics.jsonl"),
               **({"best": {**run.best, "model": str(run.dir / "best")}} if run.best else {})}
    mem = summary["memory"]
    if "phases" in mem:
        log.info("CUDA memory: peak allocated %.0f MiB (%s), reserved %.0f MiB", mem["peak_allocated_mib"],
                 ", ".join(f"{p} {v['peak_allocated_mib']:.0f}" for p, v in mem["phases"].items()),
                 mem["peak_reserved_mib"])
    summary = on_rank0(lambda: write_summary(run.dir, summary))  # every rank returns it: ranks leave together
    run.metrics.close()
    return summary

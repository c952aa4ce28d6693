"""The declared options of every config section the layers below the recipe read: pydantic only (no torch), so
that a run config loads, and `lisatune config` lists it, without the runtime.

    LisaConfig      the LISA engine's options, the paper's defaults (`LisaOptimizer(model, config)`)
    LisaOptions     a run's `lisa:` section: the engine's options with lisatune's defaults
    LoraOptions     `lora:`       GaloreOptions   `galore:`       TrainOptions    `train:` (the loop's settings)

γ is `n_layers` (the number of units active at a time, not the model's total; aliases `gamma` and ms-swift's
`lisa_activated_layers`), K is `interval` (alias `lisa_step_interval`). γ is bounded against the model where the
model is known: engine/units.py, the one place.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo,
                      field_validator, model_validator)

from .errors import LisaError
from .schema import Number, Options, parse_yaml, read_text

SINKS = ("tensorboard", "wandb")  # train.report_to's choices; metrics.jsonl is always written
Beta = Annotated[Number, Field(ge=0, lt=1)]
Steps = Annotated[StrictInt, Field(ge=1)]


class LisaConfig(Options):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    section = "lisa"

    # γ and K; the aliases are ModelScope SWIFT's names for the same settings.
    # Strict ints: a YAML `true` is not 1.
    n_layers: StrictInt = Field(2, validation_alias=AliasChoices("n_layers", "gamma", "lisa_activated_layers"),
        description="γ: the units (blocks) trained at a time, drawn again every `interval` steps")
    interval: StrictInt = Field(20, validation_alias=AliasChoices("interval", "K", "lisa_step_interval"),
        description="K: optimizer steps between two draws of the active units")
    policy: Literal["uniform", "bernoulli", "weighted", "cyclic"] = "uniform"
    # each finite, not a boolean; ranges: the sampler
    probabilities: list[Number] | str | None = Field(None,
        description="per-unit probabilities (bernoulli) or weights (weighted): a list, or a .json/.yaml/.txt file")
    seed: StrictInt = Field(0, ge=0,
        description="seed of the draws (each a pure function of seed and switch: every rank and resume agree)")
    train_embedding: bool = Field(True, description="train the embedding at every step (the always-on set)")
    train_head: bool = Field(True, description="train the output head at every step (the always-on set)")
    train_norm: bool = True  # the final norm and any other non-block language-model parameter
    sample_embed_head: bool = False  # embedding+head become one more sampled unit instead of always on
    # What the sampler draws: whole blocks, or each block's matrix-holding submodules (attention, MLP) as units
    # of their own; γ counts units either way. A block's norms train while any of its units is active.
    units: Literal["block", "module"] = Field("block",
        description="what is sampled: whole blocks, or each block's attention and MLP as units of their own")
    train_other: bool = False  # parameters outside the language model (e.g. a vision tower)
    state_policy: Literal["drop", "offload", "keep"] = Field("drop",
        description="the optimizer state of a unit that freezes: dropped, offloaded to the host, or kept")
    blocks_path: str | None = None  # dotted path to the block list, walked through registered submodules
    # groups 0 and 1; 1.0 is the same as None
    embed_head_lr: float | None = Field(None,
        description="a multiplier of train.lr for the always-on set (embedding, head, norms); null: train.lr")
    activation_warmup: StrictInt = Field(0,
        description="steps over which a newly activated unit ramps its lr up (0: none; at most interval)")
    embed_head_state: Literal["fp32", "8bit"] = Field("fp32",
        description="the always-on set's AdamW state: fp32, or 8-bit blockwise (bitsandbytes)")
    # Held by LisaAdamW, which attaches the quantization to its instance: the engine alone holds weights as given.
    frozen_weights: Literal["full", "int8", "nf4"] = Field("full",
        description="frozen blocks' linear weights as they are, or quantized to int8 / nf4 (bitsandbytes)")
    # Written when a trained block freezes and unlinked at once (its mapping keeps it): nothing is left there.
    spill_dir: str | None = Field(None,
        description="frozen_weights int8/nf4: a folder where blocks that trained keep their full-precision copy "
                    "(a mapped file, not host RAM); null: host RAM")

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data):
        """n_layers and gamma (or interval and K) are one setting: given under two names, one would be dropped."""
        if isinstance(data, dict):
            for field in ("n_layers", "interval"):
                names = cls.model_fields[field].validation_alias.choices
                given = [n for n in names if n in data]
                if len(given) > 1:
                    alias = " or ".join(given[1:])
                    raise ValueError(f"give {given[0]} or its alias {alias}, not both")
        return data

    @field_validator("spill_dir", mode="before")
    @classmethod
    def _spill_path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v  # a library user's Path

    @field_validator("spill_dir")
    @classmethod
    def _spill_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("frozen_weights") == "full":
            raise ValueError("holds the full-precision copies of quantized frozen blocks: set frozen_weights to "
                             "int8 or nf4 (with full, frozen blocks keep their weights where they compute)")
        if v is not None and not v.strip():
            raise ValueError("must be a folder path, or null")
        return v

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1 (optimizer steps between switches)")
        return v


    @field_validator("embed_head_lr", mode="before")
    @classmethod
    def _embed_head_lr_type(cls, v):
        if isinstance(v, bool):  # a YAML `true` is not the multiplier 1.0
            raise ValueError("must be a number (a multiplier of the lr), not a boolean")
        return v

    @field_validator("embed_head_lr")
    @classmethod
    def _embed_head_lr(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("must be a finite multiplier of the lr > 0 (to freeze the embedding or head, "
                             "set train_embedding / train_head to false)")
        return v

    @field_validator("activation_warmup")
    @classmethod
    def _activation_warmup(cls, v: int, info: ValidationInfo) -> int:
        # A field validator (interval is declared, so validated, before it) rather than a model validator, so
        # the error is located at lisa.activation_warmup.
        if v < 0:
            raise ValueError("must be >= 0 (optimizer steps of lr ramp after a block activates)")
        k = info.data.get("interval")
        if k is not None and v > k:
            raise ValueError(f"must be <= interval (K) = {k}: a block ramps up within the interval it is active")
        return v

    def probability_list(self) -> list[float] | None:
        p = self.probabilities
        return load_probabilities(p) if isinstance(p, str) else p


class LisaOptions(LisaConfig):
    """A run's `lisa:` section: the engine's options with lisatune's default lr for the always-on set;
    `embed_head_lr: null` (or 1.0) is the paper's LISA, the engine's own default."""
    # A tenth of the lr for the embedding, head and norms: the one mechanism of study 4 that helped on both tasks
    # (docs/results.md).
    embed_head_lr: float | None = Field(0.1,
        description="a multiplier of train.lr for the always-on set (embedding, head, norms); null: train.lr")


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: StrictInt = Field(8, ge=1, description="the adapters' rank")
    # the update is scaled by alpha / r
    alpha: StrictInt = Field(16, ge=1, description="the update is scaled by alpha / r")
    dropout: Number = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    # peft's semantics
    target_modules: list[str] | None = Field(None,
        description="module names matched by suffix (e.g. q_proj); null: every linear layer in the blocks")
    base: Literal["full", "nf4", "int8"] = Field("full",
        description="the frozen base's block linears: full precision, or quantized by bitsandbytes (nf4: QLoRA; "
                    "int8), saved in full precision")


class GaloreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: StrictInt = Field(128, ge=1,
        description="the rank of the gradient's projection (matrices not larger than it train with plain AdamW)")
    update_proj_gap: StrictInt = Field(200, ge=1)  # optimizer steps between SVDs of the gradient
    scale: Number = Field(0.25, gt=0, description="the projected update's scale")
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field("std",
        description="which side(s) of the gradient the projection acts on")


class TrainOptions(BaseModel):
    """The loop's settings. Every number is checked: finite, in range, and an integer where one is meant (a
    YAML `true` is not 1, `4.0` is not 4); a bad value is one line naming it."""
    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field("runs/default",
        description="the run directory: checkpoints, metrics.jsonl, final/ (the trained model)")
    seed: StrictInt = Field(0, ge=0,
        description="seed of the data order and the model's initialisation of new parameters")
    lr: Number = Field(1e-4, gt=0, description="the peak learning rate (after warmup; the schedule decays it)")
    weight_decay: Number = Field(0.0, ge=0, description="AdamW's decoupled weight decay (not on norms and biases)")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW's beta1, beta2")
    eps: Number = Field(1e-8, gt=0, description="AdamW's epsilon")
    batch_size: StrictInt = Field(4, ge=1, description="sequences per micro-batch, per process")
    grad_accum: StrictInt = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: Steps | None = None  # optimizer steps; overrides epochs
    epochs: Number = Field(1.0, gt=0, description="passes over the training data (unless max_steps is set)")
    warmup_steps: StrictInt = Field(0, ge=0, description="optimizer steps of linear lr warmup")
    warmup_ratio: Number = Field(0.0, ge=0, lt=1)  # warmup as a fraction of the run's steps (rounded up), as HF's
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="the lr schedule after warmup")
    # cosine/linear decay to this fraction of train.lr instead of 0 (the embedding/head's lr alike)
    min_lr_ratio: Number = Field(0.0, ge=0, le=1,
        description="cosine/linear decay to this fraction of train.lr instead of 0")
    max_grad_norm: Number | None = 1.0  # clip the gradient's global norm to this; null (None): no clipping
    # bf16-mixed: bf16 weights (model.dtype is then bf16), fp32 master weights and fp32 optimizer state for
    # what is trained: LISA only for the active set (made and freed at each switch), full for every parameter.
    precision: Literal["fp32", "bf16-mixed"] = Field("fp32",
        description="fp32, or bf16 weights with fp32 masters and optimizer state for what is trained (bf16-mixed)")
    # bf16-mixed: the master step casts trained gradients to fp32 in chunks of at most this many MiB, slicing a
    # larger tensor (bitwise the same step); null: chunks up to the largest trained tensor (an 8B embedding: 2 GiB).
    step_chunk_mib: StrictInt | None = Field(None, ge=1,
        description="bf16-mixed: cap the master step's fp32 transient at this many MiB (null: the largest tensor)")
    # fp32 on a CUDA device: matmuls on TF32 tensor cores (10-bit mantissa products, fp32 accumulation; several
    # times faster on A100/H100). false: full fp32 products. Nothing changes on a CPU.
    tf32: StrictBool = True
    # Head + cross-entropy over chunks of labelled tokens: no full logits tensor (one process or DDP, not FSDP;
    # checked against the model's own loss on a batch first). false: the model's own forward(labels=...).loss.
    fused_loss: StrictBool = Field(True,
        description="head + cross-entropy over chunks of labelled tokens: no full logits tensor")
    # Linux/glibc: serve large allocations with mmap at a fixed threshold, so freed tensors leave the process
    # at once instead of staying resident in the heap. On SmolLM2 (CPU): peak RSS -0.5 GB, steps ~35 % slower
    # (docs/benchmarks.md): for when memory, not time, is what runs out.
    release_memory: StrictBool = Field(False,
        description="glibc: give freed memory back to the system at once (less peak RSS, slower steps)")
    # LISA with quantized frozen blocks or offloaded state: refuse at setup a run whose host copies would not
    # fit the RAM available (recipe/host_memory.py). false: start anyway (swap, or a machine that frees memory).
    check_host_ram: StrictBool = Field(True,
        description="refuse at setup a LISA run whose host copies (quantized blocks, offloaded state) do not fit")
    eval_every: StrictInt = Field(0, ge=0)  # 0: evaluate only before and after training
    eval_before: StrictBool = True  # false: no evaluation before the first step (the summary's "before" is null)
    eval_batch_size: StrictInt = Field(8, ge=1, description="sequences per evaluation batch")
    gsm_eval_samples: StrictInt = Field(8, ge=0)  # exact-match accuracy on this many held-out problems (GSM data)
    gsm_max_new_tokens: StrictInt = Field(200, ge=1, description="the longest answer generated per GSM problem")
    # lm-evaluation-harness tasks, run at each evaluation (pip install 'lisatune[eval]'): lisatune's own
    # lisatune_gsm (generation) and lisatune_gsm_mc (log-likelihood), tasks in eval_include_path, lm-eval's.
    eval_tasks: list[StrictStr] = Field([],
        description="lm-evaluation-harness tasks run at each evaluation (pip install 'lisatune[eval]')")
    eval_include_path: str | None = None  # a folder of lm-eval task YAML files
    # Their `!function` entries import and run Python from that folder: refused unless this opt-in is true
    # (as a model's trust_remote_code).
    eval_allow_task_code: StrictBool = Field(False,
        description="allow task files under eval_include_path to run their `!function` Python")
    eval_limit: Steps | None = None  # documents per task (none: every one)
    save_every: StrictInt = Field(0, ge=0)  # 0: checkpoint only at the end (and on interrupt)
    # false: no checkpoint (weights + optimizer state) at the end, only final/ (save_every ones are still written)
    save_final_state: StrictBool = Field(True,
        description="a last checkpoint (weights + optimizer state) at the end, besides final/")
    keep_last: StrictInt = Field(2, ge=1, description="checkpoints kept (older ones are deleted)")
    # Seconds a rank waits in a collective while rank 0 works alone (a checkpoint write, lm-eval tasks) before
    # the run fails in one line; torch's own default is 10 minutes under NCCL, short for a 70B checkpoint.
    collective_timeout: StrictInt = Field(3600, ge=1,
        description="seconds a rank waits for the others (a checkpoint write, lm-eval) before failing")
    # eval_loss: the model of the evaluation (after step 1) with the lowest held-out loss so far is kept in
    # <output_dir>/best (a Hugging Face model directory), replaced when a later evaluation is lower.
    keep_best: Literal["eval_loss"] | None = Field(None,
        description="keep the model of the evaluation with the lowest held-out loss in <output_dir>/best")
    log_every: StrictInt = Field(1, ge=1, description="optimizer steps between two rows of metrics.jsonl")
    resume: bool | Literal["auto"] = False  # True: must resume; "auto": resume if a checkpoint exists
    overwrite: StrictBool = False  # replace output_dir, if it is a lisatune run directory (never anything else)
    # Resume although the training data's content changed since the checkpoint was written (its fingerprint
    # is stored in every checkpoint); normally that is refused, since the resumed run would not be the same run.
    # Also accepted under the name allow_data_change.
    data_may_change: StrictBool = Field(False, validation_alias=AliasChoices("data_may_change", "allow_data_change"),
        description="resume although the training data changed since the checkpoint (alias allow_data_change)")
    merge_lora: StrictBool = True  # save LoRA merged into a plain model (else the adapter)
    tensorboard: StrictBool = True  # older name of report_to: [tensorboard] (true) or [] (false)
    # Where metrics go besides metrics.jsonl: tensorboard (<output_dir>/tb) and/or wandb (Weights & Biases,
    # offline unless WANDB_MODE says otherwise, under <output_dir>/wandb; pip install 'lisatune[wandb]').
    # none: [tensorboard] if train.tensorboard, else []
    report_to: list[Literal[SINKS]] | None = Field(None,
        description="where metrics go besides metrics.jsonl; null: [tensorboard] if train.tensorboard, else []")

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, data):
        if isinstance(data, dict) and {"data_may_change", "allow_data_change"} <= set(data):
            raise ValueError("give data_may_change or its alias allow_data_change, not both")
        return data

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps: give it or warmup_ratio, not both")
        return self

    def warmup(self, total: int) -> int:
        """Warmup steps of a run of `total` optimizer steps."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, v):
        if not (isinstance(v, bool) or v == "auto"):  # not 1, "yes" or "true": those are for YAML to parse
            raise ValueError("must be true, false or 'auto'")
        return v

    def sinks(self) -> list[str]:
        """Metrics.report_to: report_to, or what train.tensorboard meant before it existed."""
        return self.report_to if self.report_to is not None else ["tensorboard"] if self.tensorboard else []

    @model_validator(mode="after")
    def _report_to(self):
        if self.report_to is not None and len(set(self.report_to)) < len(self.report_to):
            raise ValueError(f"report_to: {self.report_to} names a sink twice")
        if self.report_to is not None and "tensorboard" in self.model_fields_set:
            raise ValueError("report_to: give it or train.tensorboard (its older form), not both")
        return self

    @model_validator(mode="after")
    def _harness(self):
        if self.eval_include_path is not None and not self.eval_tasks:
            raise ValueError("eval_include_path: set train.eval_tasks too (the tasks to run from it)")
        return self

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:  # 0 used to mean "no clipping" and a negative one trained uphill
            raise ValueError("must be > 0 (or null for no clipping)")
        return v



def load_probabilities(path: str) -> list[float]:
    """A JSON/YAML list or {"probabilities": [...]}, or a text file with one number per line."""
    f = Path(path)
    text = read_text(f, "probabilities file")
    if f.suffix in (".json", ".yaml", ".yml"):
        if f.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise LisaError(f"{path}: not valid json: {e}") from None
        else:
            data = parse_yaml(text, str(path))
        if isinstance(data, dict):
            data = data.get("probabilities")
        if not isinstance(data, list):
            raise LisaError(f"{path}: expected a list of numbers or a 'probabilities' list")
        values = data
    else:
        values = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):  # float(True) is 1.0: a YAML `true` in the list is a mistake
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError):
            raise LisaError(f"{path}: entry {i + 1} ({v!r}) is not a number") from None
    return out

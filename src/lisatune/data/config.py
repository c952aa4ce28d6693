"""DataConfig: the validated options of the data section (what a YAML `data:` section holds)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from ..schema import Number, Options
from .chat import CHAT_ROLES, is_template_text
from .formats import FORMATS
from .render import LOSS_ON

# Each format's record fields (True: required); data.columns may map them to other column names.
FIELDS: dict[str, dict[str, bool]] = {name: f.fields for name, f in FORMATS.items()}


SOURCE_FORMATS = tuple(f for f in FORMATS if f != "gsm")  # the formats read from a source


class DatasetEntry(Options):
    """One source of data.datasets: read as a single data.path is; an unset key takes the top-level data.* value."""
    section = "data.datasets[i]"

    path: str = Field(description="a file, a save_to_disk directory or a Hub dataset name, as data.path")
    format: Literal[SOURCE_FORMATS] | None = Field(None, description=(
        "as data.format; default: data.format if set, else inferred from this source's first record"))
    split: str | None = Field(None, description="as data.split; default: data.split")
    columns: dict[str, str] | None = Field(None, description="as data.columns; default: data.columns")
    max_samples: StrictInt | None = Field(None, ge=1, description="as data.max_samples; default: data.max_samples")


class DataConfig(Options):
    section = "data"

    format: Literal[tuple(FORMATS)] = "gsm"
    # alpaca: JSON array or JSONL; chat: JSONL with `messages`; sharegpt: JSONL with `conversations`;
    # text: .txt (blank-line separated) or JSONL `text`.
    # A .json/.jsonl/.csv/.parquet/.arrow file (text: also .txt), a save_to_disk directory or a Hub dataset name.
    path: str | None = None
    val_path: str | None = None  # same format as `path`
    split: str = "train"  # of a Hub dataset or a saved DatasetDict (a single file is one split)
    val_split: str = "validation"  # the same, for val_path
    columns: dict[str, str] = {}  # format field -> the dataset's column, e.g. {instruction: prompt}
    # Several sources in one run (axolotl's `datasets:`, LLaMA-Factory's `dataset: a,b`), instead of `path`
    datasets: list[DatasetEntry] | None = Field(None, min_length=1, description=(
        "several training sources instead of data.path: a list of {path, format, split, columns, max_samples}, "
        "each read as data.path is (unset keys: the data.* value); their examples are concatenated in order, and "
        "the loop's shuffling mixes them"))
    max_samples: StrictInt | None = Field(None, ge=1, description=(
        "at most this many records of each training source (data.path, or each of data.datasets): the first ones "
        "after the split's slice, before val_fraction holds out part and before over-long examples are dropped "
        "(format text: documents); val_path is not capped (see val_max_examples)"))
    val_fraction: Number = 0.0  # held out from `path` (or the datasets together) by a seeded shuffle
    val_max_examples: StrictInt | None = None  # cap on the validation set, so evaluation stays cheap
    max_length: StrictInt = 256  # tokens; longer examples are dropped (not truncated, which would cut answers)
    # Several examples in one sequence of <= max_length tokens, each attending only to itself (data/pack.py);
    # train.batch_size then counts packed sequences. An example longer than max_length is an error.
    packing: StrictBool = False
    seed: StrictInt = Field(0, ge=0)
    system_prompt: str | None = None  # chat, sharegpt: the system message of conversations that have none
    # chat, sharegpt: the tokens that carry loss: every assistant turn, the last assistant turn, or every token
    loss_on: Literal[LOSS_ON] = "assistant"
    # A Jinja chat template, or the path of a file holding one; None: the model's (tokenizer_config.json)
    chat_template: str | None = None
    # chat, sharegpt: role names of the data -> the template's roles, on top of the built-in names (system, user,
    # human, assistant, gpt, model; with tools also tool, observation, function_call). axolotl's direction
    # (template role -> list of names) is accepted too: {assistant: [bot, ai]}.
    roles: dict[str, str | list[str]] = Field({}, description=(
        "chat, sharegpt: the data's role names -> system | user | assistant | tool, e.g. {bot: assistant}, or "
        "axolotl's {assistant: [bot, ai]}; on top of the built-in names"))
    # chat, sharegpt: the keys of a message, e.g. {role: speaker, content: text}; default role/content (chat) and
    # from/value (sharegpt), either format reading the other's keys too (axolotl's message_property_mappings).
    message_keys: dict[str, str] = Field({}, description=(
        "chat, sharegpt: a message's keys, {role: KEY, content: KEY}; default role/content or from/value"))
    # GSM-symbolic generator: whole templates are held out, so eval measures transfer to unseen problems.
    gsm_variants: StrictInt = 8  # numeric variants per training template
    gsm_eval_templates: StrictInt = 20
    gsm_eval_variants: StrictInt = 2
    gsm_templates: StrictInt | None = None  # use only the first N templates (small, fast data)
    gsm_language: str = "eng"

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be >= 0 and < 1")
        return v

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 8:
            raise ValueError("must be >= 8 (tokens)")
        return v

    @field_validator("gsm_variants", "gsm_eval_variants", "gsm_templates", "val_max_examples")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("gsm_eval_templates")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is not None and not is_template_text(v) and not Path(v).expanduser().is_file():
            raise ValueError("neither a file nor a template (a template has {{ ... }} or {% ... %} tags)")
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: dict) -> dict[str, str]:
        out = {}
        for name, role in v.items():
            if isinstance(role, list):  # axolotl's direction: template role -> the data's names
                if name not in CHAT_ROLES:
                    raise ValueError(f"{name}: a list maps names to a template role, and '{name}' is not one "
                                     f"({', '.join(CHAT_ROLES)})")
                out |= {str(n): name for n in role}
            elif role not in CHAT_ROLES:
                raise ValueError(f"{name}: '{role}' is not a role of the chat template ({', '.join(CHAT_ROLES)})")
            else:
                out[name] = role
        return out

    @field_validator("message_keys")
    @classmethod
    def _message_keys(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - {"role", "content"})
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a message part (role, content)")
        return v

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.datasets is not None:
            if self.path is not None:
                raise ValueError("data.path and data.datasets are both set: give one (data.path is one source, "
                                 "data.datasets a list of them)")
            self._resolve_datasets()
        if self.format == "gsm":
            # GSM validation is the held-out templates; a second source would be ambiguous.
            if self.path or self.val_path or self.val_fraction:
                raise ValueError("format 'gsm' generates its data: path, val_path and val_fraction are not used "
                                 "(validation is the held-out templates, see gsm_eval_templates)")
            if self.max_samples is not None:
                raise ValueError("max_samples is for sources read from data.path or data.datasets; format 'gsm' "
                                 "generates its problems (see gsm_templates, gsm_variants)")
        else:
            if not self.path and not self.datasets:
                raise ValueError(f"format '{self.format}' needs data.path (the training file) or data.datasets")
            if self.val_path and self.val_fraction:
                raise ValueError("set val_path or val_fraction, not both")
        unknown = sorted(set(self.columns) - set(FIELDS[self.format]))
        if unknown:
            fields = ", ".join(FIELDS[self.format]) or "none"
            raise ValueError(f"columns: '{unknown[0]}' is not a field of format '{self.format}' (fields: {fields})")
        formats = {e.format for e in self.datasets} if self.datasets else {self.format}
        chat = formats & {"chat", "sharegpt"}
        if self.packing and "text" in formats:
            raise ValueError("packing is for formats alpaca, chat, sharegpt and gsm: format 'text' already fills "
                             "every sequence (documents joined with EOS, cut into blocks of max_length)")
        for name in ("roles", "message_keys"):
            if getattr(self, name) and not chat:
                raise ValueError(f"{name} is for formats chat and sharegpt, not '{self.format}'")
        if self.system_prompt and not chat:
            raise ValueError(f"system_prompt is for formats chat and sharegpt, not '{self.format}'")
        if self.loss_on != "assistant" and not chat:
            raise ValueError(f"loss_on is for formats chat and sharegpt, not '{self.format}' (alpaca and gsm train "
                             "on the response, text on every token)")
        if self.chat_template is not None and formats == {"text"}:
            raise ValueError("chat_template has no effect with format 'text' (plain documents); leave it out")
        return self

    def _resolve_datasets(self) -> None:
        """Each entry's unset keys from data.*; an entry without a format (and no data.format) has it inferred from
        its first record. data.format becomes the first entry's when not set (val_path is read in it)."""
        given = "format" in self.model_fields_set and self.format != "gsm"
        if "format" in self.model_fields_set and self.format == "gsm":
            raise ValueError("format 'gsm' generates its data: data.datasets is not used (set each entry's format, "
                             "or data.format to the format of the sources)")
        resolved = []
        for i, e in enumerate(self.datasets):
            key = f"data.datasets[{i}]"
            split = e.split if e.split is not None else self.split
            columns = dict(e.columns if e.columns is not None else self.columns)
            fmt = e.format or (self.format if given else None)
            if fmt is None:  # the run config infers it from the source (recipe/config.py infer_formats)
                raise ValueError(f"{key}.format: not given, and data.format is not set")
            unknown = sorted(set(columns) - set(FIELDS[fmt]))
            if unknown:
                raise ValueError(f"{key}.columns: '{unknown[0]}' is not a field of format '{fmt}' "
                                 f"(fields: {', '.join(FIELDS[fmt])})")
            resolved.append(e.model_copy(update={
                "format": fmt, "split": split, "columns": columns,
                "max_samples": e.max_samples if e.max_samples is not None else self.max_samples}))
        self.datasets = resolved
        if not given:
            self.format = resolved[0].format

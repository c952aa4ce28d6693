"""`lisatune generate MODEL`: one streamed completion of --prompt, or a chat over stdin (a turn a line).

The prompt is rendered exactly as training renders one (data.render: the chat template, or the plain
instruction prompt of a base model), so a fine-tuned model is asked the way it was taught.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from transformers import TextStreamer

from ..data.render import encode_prompt
from ..errors import LisaError
from .evaluate import placement
from .models import ModelConfig, load_model


def generate(model, tokenizer, ids: list[int], max_new_tokens: int, temperature: float) -> str:
    """Stream the completion of `ids` to stdout as it is generated; return it (special tokens dropped)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    # top_k/top_p from the model's generation_config only apply when sampling; keep them out of greedy runs.
    greedy = {} if temperature > 0 else {"top_k": None, "top_p": None, "temperature": None}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling, **greedy)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation with the assistant's turn opened, tokenized as training does (no added specials)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(model, tokenizer, lines, max_new_tokens: int, temperature: float, system: str | None = None) -> None:
    """One reply per non-empty input line, the conversation so far as context, until EOF."""
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chatting with the model; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = generate(model, tokenizer, chat_ids(tokenizer, messages), max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": reply.strip()})


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise LisaError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if not math.isfinite(args.temperature) or args.temperature < 0:  # nan passed `< 0` and sampled garbage
        raise LisaError(f"--temperature must be a finite number >= 0 (got {args.temperature}; 0 is greedy)")
    dtype, device = placement(args.model)  # the model's own dtype (bf16 stays bf16), on the GPU if there is one
    model, tok = load_model(ModelConfig.build(source=args.model, trust_remote_code=args.trust_remote_code,
                                              dtype=dtype))
    model.to(device).eval()
    torch.manual_seed(args.seed)
    if not tok.chat_template and (args.prompt is None or args.system):
        raise LisaError(f"'{args.model}' has no chat template, so no chat and no system message; "
                        "pass --prompt TEXT alone")
    if args.prompt is None:
        chat(model, tok, sys.stdin, args.max_new_tokens, args.temperature, args.system)
    elif args.system:
        generate(model, tok, chat_ids(tok, [{"role": "system", "content": args.system},
                                            {"role": "user", "content": args.prompt}]),
                 args.max_new_tokens, args.temperature)
    else:
        generate(model, tok, encode_prompt(tok, args.prompt), args.max_new_tokens, args.temperature)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate")  # (its line in `lisatune --help`: cli.COMMANDS)
    g.add_argument("model", help="model directory (e.g. runs/default/final), .gguf file, or 'smollm2'")
    g.add_argument("--prompt", help="one prompt, answered once; without it: a chat, one turn per stdin line")
    g.add_argument("--system", help="a system message (models with a chat template)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    g.add_argument("--seed", type=int, default=0, help="for sampling")
    g.add_argument("--trust-remote-code", action="store_true")
    g.set_defaults(func=cmd_generate)

"""Causal-LM loss without the full logits tensor: the head and cross-entropy run over chunks of tokens.

A 49k-vocabulary head on 4 x 256 tokens makes 192 MiB of fp32 logits, as much again for their
log-softmax and for their gradient. Here only the labelled positions go through the head, a chunk at a time,
and the gradients of the hidden states and of the head are formed in the same pass (softmax - one-hot), so
no chunk's logits outlive it and nothing is recomputed. The loss equals the model's own (mean cross-entropy
over labelled next tokens); `check_fused` verifies that on a real batch before a run relies on it.
Under DDP the wrapper's forward still runs (it prepares the gradient all-reduce), asked for the hidden states
and the logits of one position only; the head's gradient then reaches DDP's hooks like any other.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..data.render import IGNORE
from ..engine import unwrap
from ..engine.layers import decoder_of

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in fp32
log = logging.getLogger("lisatune")


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of (h @ W.T + b) against targets, with the gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows, grad_enabled):
        # needs_input_grad ignores no_grad(): evaluation would pay for gradients nobody asked for.
        need_h, need_w, need_b = (n and grad_enabled for n in ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        # Accumulated over chunks in fp32, as one matmul over all rows would.
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, h.shape[0], rows):
            hc, y = h[s:s + rows], targets[s:s + rows]
            logits = (hc @ weight.T if bias is None else torch.addmm(bias, hc, weight.T)).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(len(y), device=y.device), y] -= 1
                p = p.to(h.dtype)
                if need_h:
                    torch.mm(p, weight, out=gh[s:s + rows])
                if need_w:
                    gw.addmm_(p.T.float(), hc.float())
                if need_b:
                    gb += p.sum(0, dtype=torch.float32)
        # Kept on ctx, not saved_for_backward: backward hands them over without a second reference, so
        # autograd adopts the head's gradient instead of copying it.
        ctx.grads = [gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None]
        return total

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused loss supports one backward pass per forward (no retain_graph)")
        for g in grads:
            if g is not None:
                g.mul_(grad.to(g.dtype))
        return (*grads, None, None, None)


def held_hidden_grads(loss: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the hidden states the fused loss formed during forward and holds (ctx.grads) until
    backward: memory a step holds beside its saved activations (the head's gradient, held there too, becomes
    its .grad). Empty for the model's own loss. Drop the list before backward, or autograd copies the head's
    gradient instead of adopting it."""
    out, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _LinearCrossEntropy._backward_cls) and node.grads and node.grads[0] is not None:
            out.append(node.grads[0])
        todo += [n for n, _ in node.next_functions]
    return out


def head_of(model: nn.Module) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None


def model_inputs(input_ids, attention_mask, position_ids=None) -> dict:
    """A batch as the model takes it. Packed sequences (position_ids, no mask) go without a cache: transformers
    looks for packed examples only when there is none, and would otherwise let them attend to each other."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    return inputs if position_ids is None else inputs | {"position_ids": position_ids, "use_cache": False}


def _hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    inner = unwrap(model)
    if inner is model:
        return decoder_of(model)(**inputs)[0]
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1]  # after the final norm, as the head sees it (check_fused verifies)


def fused_loss(model: nn.Module, input_ids, attention_mask, labels, reduction: str = "mean",
               position_ids=None) -> torch.Tensor:
    """The model's causal-LM loss (mean, or sum, over labelled next tokens), computed chunk-wise."""
    hidden = _hidden_states(model, model_inputs(input_ids, attention_mask, position_ids))
    targets = labels[:, 1:]
    if hidden.device.type == "meta":
        # `lisatune plan` (no values to select by): every position counts as labelled, the most memory; the
        # boolean index of a real run saves its mask for backward, which the planner counts itself.
        h, y = hidden[:, :-1].flatten(0, 1), targets.flatten()
    else:
        keep = targets != IGNORE
        h, y = hidden[:, :-1][keep], targets[keep]
    head = head_of(unwrap(model))
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    total = _LinearCrossEntropy.apply(h, head.weight, head.bias, y, rows, torch.is_grad_enabled())
    return total if reduction == "sum" else total / y.numel()


def standard_loss(model: nn.Module, input_ids, attention_mask, labels, reduction: str = "mean",
                  position_ids=None) -> torch.Tensor:
    """The model's own logits and cross-entropy (any model, any wrapper)."""
    inputs = model_inputs(input_ids, attention_mask, position_ids)
    if reduction == "mean":
        return model(**inputs, labels=labels).loss
    logits = model(**inputs).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE, reduction="sum")


def check_fused(model: nn.Module, batch: dict, rtol: float = 1e-4) -> str | None:
    """None if the fused loss can stand in for the model's on this batch, else the reason it cannot.

    `model` is what training calls (a DDP wrapper checks both its own path and the plain model's, which
    evaluation uses). Collective under DDP: every rank calls it.
    """
    inner = unwrap(model)
    if head_of(inner) is None or decoder_of(inner) is None:
        return "the model has no plain Linear output head behind get_decoder()"
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        return "the model is sharded"
    was = inner.training  # a wrapper's own flag may differ from the model's
    inner.eval()  # no dropout, so the two losses see the same network
    try:
        with torch.no_grad():
            ref = standard_loss(model, **batch).float()
            got = [fused_loss(m, **batch) for m in dict.fromkeys([model, inner])]
    except Exception as e:  # a decoder that wants other inputs, say: the model's own path still works
        return f"{type(e).__name__}: {e}"
    finally:
        inner.train(was)
    for g in got:
        if not torch.allclose(g, ref, rtol=rtol, atol=1e-5):
            return f"fused loss {g.item():.6f} != the model's {ref.item():.6f} (extra logit processing?)"
    return None


def pick_loss(model: nn.Module, batch: dict, fused: bool):
    """The loss function a run uses: fused if asked for and it checks out on `batch`, else the model's own."""
    if fused:
        why = check_fused(model, batch)
        if why is None:
            return fused_loss
        log.info("fused loss off: %s; using the model's own logits and loss", why)
    return standard_loss

"""Find the parts LISA switches in any Hugging Face causal LM.

A model splits into *units*: each transformer block, and the embedding, head and
"norm" (the final norm plus any other language-model parameter outside the blocks).
Parameters outside the language model (a vision tower, a projector) are "other".
Discovery never evaluates strings: an override path walks registered submodules only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import LisaError

Named = list[tuple[str, nn.Parameter]]


@dataclass
class LayerMap:
    blocks_path: str
    blocks: list[Named]
    embedding: Named = field(default_factory=list)
    head: Named = field(default_factory=list)
    norm: Named = field(default_factory=list)
    other: Named = field(default_factory=list)
    tied: bool = False  # embedding and head share one tensor (counted once, in `embedding`)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def units(self) -> dict[str, Named]:
        """The model's parts by name, in model order: embedding, block0..N-1, head, norm (empty ones left out).

        A tied head is the embedding's tensor, so it is listed under both names."""
        parts = {"embedding": self.embedding, **{f"block{i}": b for i, b in enumerate(self.blocks)},
                 "head": self.embedding if self.tied else self.head, "norm": self.norm}
        return {k: v for k, v in parts.items() if v}


def split_block(prefix: str, named: Named) -> tuple[dict[str, Named], Named]:
    """A block's parameters (named `prefix.<child>...`) by direct child: the children holding a matrix (attention,
    MLP), in model order, and the rest (norms, loose parameters), which belong to the block as a whole."""
    by_child: dict[str, Named] = {}
    for name, p in named:
        child = name.removeprefix(prefix + ".").split(".", 1)[0]
        by_child.setdefault(child, []).append((name, p))
    subs = {c: ps for c, ps in by_child.items() if any(p.ndim >= 2 for _, p in ps)}
    shared = [np for c, ps in by_child.items() if c not in subs for np in ps]
    return subs, shared


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a wrapper that holds it as `.module` (DDP, LisaDDP, accelerate), else the model."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _describe(path: str, mlist: nn.ModuleList) -> str:
    kinds = sorted({type(m).__name__ for m in mlist})
    return f"{path} ({len(mlist)} x {'/'.join(kinds)})"


def candidate_block_lists(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.ModuleList]]:
    """Non-empty, homogeneous ModuleLists under `root` that are not nested in another such list."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in root.named_modules(prefix=prefix):
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue  # e.g. the experts of an MoE block
        found.append((name, mod))
    return found


def resolve_path(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path through registered submodules only (never eval, never plain attributes)."""
    obj = model
    walked = type(model).__name__
    for part in path.split("."):
        child = obj._modules.get(part) if part else None
        if child is None:
            cands = ", ".join(_describe(p, m) for p, m in candidate_block_lists(model)) or "none"
            raise LisaError(
                f"blocks_path '{path}' not found: {walked} has no submodule '{part}' "
                f"(module lists in this model: {cands})"
            )
        obj = child
        walked += f".{part}"
    return obj


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The model's decoder stack (`get_decoder()`: the language model inside a VLM), if it is a submodule."""
    get = getattr(model, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except Exception:  # some remote-code models raise here
        return None
    return dec if isinstance(dec, nn.Module) and dec is not model else None


def _language_scope(model: nn.Module) -> tuple[str, nn.Module]:
    """The language model inside `model` (for VLMs, not the vision tower), else the model itself."""
    dec = decoder_of(model)
    path = _module_path(model, dec) if dec is not None else None
    return (path, dec) if path is not None else ("", model)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    scope_path, scope = _language_scope(model)
    cands = candidate_block_lists(scope, prefix=scope_path)
    if not cands and scope is not model:
        cands = candidate_block_lists(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    preferred = [(p, m) for p, m in cands if type(m[0]).__name__ in no_split]
    if len(preferred) >= 1:
        cands = preferred
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise LisaError(
            f"could not find the transformer blocks of {type(model).__name__}: no module list found; "
            "pass blocks_path (e.g. 'model.layers')"
        )
    # Several lists: the one holding most parameters, if it clearly dominates.
    sizes = sorted(((sum(p.numel() for p in m.parameters()), p, m) for p, m in cands), key=lambda t: -t[0])
    if sizes[0][0] > sizes[1][0]:
        return sizes[0][1], sizes[0][2]
    listed = ", ".join(_describe(p, m) for p, m in cands)
    raise LisaError(f"ambiguous transformer blocks in {type(model).__name__}: {listed}; pass blocks_path")


def find_layers(model: nn.Module, blocks_path: str | None = None) -> LayerMap:
    """Split the model's parameters into blocks, embedding, head, norm and other."""
    if blocks_path:
        blocks = resolve_path(model, blocks_path)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise LisaError(
                f"blocks_path '{blocks_path}' is a {type(blocks).__name__}, not a non-empty list of blocks"
            )
        path = blocks_path
    else:
        path, blocks = _find_blocks(model)

    owner: dict[int, str] = {}  # id(param) -> unit
    block_params: list[Named] = []
    for i, block in enumerate(blocks):
        named = [(f"{path}.{i}.{n}", p) for n, p in block.named_parameters()]
        block_params.append(named)
        for _, p in named:
            owner[id(p)] = f"block{i}"

    emb_mod = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_ids = {id(p) for p in emb_mod.parameters()} if emb_mod is not None else set()
    head_ids = {id(p) for p in head_mod.parameters()} if head_mod is not None else set()
    tied = bool(emb_ids & head_ids)
    scope_path, _ = _language_scope(model)

    lm = LayerMap(blocks_path=path, blocks=block_params, tied=tied)
    for name, p in model.named_parameters():  # deduplicates tied tensors
        if id(p) in owner:
            continue
        mod_path = name.rsplit(".", 1)[0]
        mod = model.get_submodule(mod_path) if "." in name else model
        if id(p) in emb_ids or isinstance(mod, nn.Embedding) and _inside(mod_path, scope_path):
            lm.embedding.append((name, p))  # token and learned position embeddings
        elif id(p) in head_ids:
            lm.head.append((name, p))
        elif _inside(mod_path, scope_path):
            lm.norm.append((name, p))
        else:
            lm.other.append((name, p))
    return lm


def _inside(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")

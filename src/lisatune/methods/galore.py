"""GaLore (galore_torch): full-parameter training whose Adam state lives in a low-rank projection of
each block matrix's gradient.

Which matrices are projected: the 2-D weights of the blocks' Linear/Conv1D layers whose smaller side is
larger than `rank`. A matrix with min(shape) <= rank cannot be compressed (the projection would be
full-rank and hold *more* state than Adam), and galore_torch 1.0's "reverse_std" crashes on such wide
matrices, so those train with plain AdamW in the same optimizer. Tiny test models therefore need a small
rank (e.g. 8) to exercise the projection at all.
"""
from __future__ import annotations

import logging
import torch
import torch.serialization

from ..engine import decay_groups
from ..options import GaloreOptions
from .base import Method, block_linears, trainable

log = logging.getLogger("lisatune")


class Galore(Method):
    name = "galore"
    Options = GaloreOptions

    def make_optimizer(self, model, hyper):
        from galore_torch import GaLoreAdamW  # deferred: it loads bitsandbytes (seconds)
        from galore_torch.galore_projector import GaLoreProjector

        # Its state holds a projector object per matrix: allow exactly that class in weights_only loads.
        torch.serialization.add_safe_globals([GaLoreProjector])

        o = self.options
        _, mods = block_linears(model)
        weights = [m.weight for m in mods.values() if m.weight.requires_grad]
        projected = [w for w in weights if min(w.shape) > o.rank]
        ids = {id(w) for w in projected}
        rest = [p for p in trainable(model) if id(p) not in ids]
        log.info("GaLore projects %d of %d block matrices at rank %d; the rest train with plain AdamW",
                 len(projected), len(weights), o.rank)
        if weights and not projected:
            log.warning("GaLore rank %d is not below any block matrix's smaller side: nothing is projected",
                        o.rank)
        # galore_torch treats a group as GaLore when it has a "rank" key; the other keys configure its projector.
        galore = {"params": projected, "rank": o.rank, "update_proj_gap": o.update_proj_gap,
                  "scale": o.scale, "proj_type": o.proj_type}
        opt = GaLoreAdamW(decay_groups(rest) + [galore], **hyper, no_deprecation_warning=True)
        opt.register_step_post_hook(_own_projections)
        opt.register_load_state_dict_post_hook(_projectors_to_params)
        return opt


def _projectors_to_params(opt) -> None:
    """torch moves loaded state tensors to their parameter's device, but not a tensor inside an object: a resumed
    projector's matrix would stay where it was read (the CPU) and the first step that reuses it would fail."""
    for p, st in opt.state.items():
        proj = st.get("projector")
        m = getattr(proj, "ortho_matrix", None)
        if isinstance(m, torch.Tensor) and m.device != p.device:
            proj.ortho_matrix = m.to(p.device)


def _own_projections(opt, *_):
    """galore_torch keeps U[:, :r] / Vh[:r] as views of the whole SVD factor: copy out the r rows or
    columns so the rest is freed (for SmolLM2 at rank 128 that factor is 4.5x the projection)."""
    for st in opt.state.values():
        proj = st.get("projector")
        m = getattr(proj, "ortho_matrix", None)
        if isinstance(m, torch.Tensor) and m.untyped_storage().nbytes() > m.numel() * m.element_size():
            proj.ortho_matrix = m.clone()

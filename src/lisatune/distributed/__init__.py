"""LISA on torch.distributed's own engines: DDP (re-wrapped at each switch) and FSDP2 (per-block shards).

    agree        every rank holds the same active set (a switch hook on the optimizer instance)
    ddp          LisaDDP, no_sync
    fsdp         shard_model, full (unsharded) model and optimizer state dicts, full_model
    collectives  all_sum, on_rank0, rank, world: no-ops in one process
    launch       the backends (none, ddp, fsdp: BACKENDS), launch_mode, prepare_model / wrap_model: `lisatune train`
                 under torchrun or accelerate launch
Checkpoints of any of these, at any world size, are lisatune.recipe.checkpoint's. See docs/distributed.md.
"""
from .agree import attach_rank_check, verify_active_set
from .collectives import all_sum, barrier, gather_to_rank0, initialized, is_dtensor, on_rank0, rank, world
from .ddp import LisaDDP, no_sync
from .fsdp import (INDEX, fill_tied, drop_tied, full_model, full_model_state_dict, full_optimizer_state_dict,
                   load_full_model_state_dict, load_full_optimizer_state_dict, plain_class, read_tensor_refs, shard_model,
                   write_full_model, write_full_optimizer)
from .launch import launch_mode, prepare_model, wrap_model

__all__ = ["INDEX", "LisaDDP", "attach_rank_check", "all_sum", "barrier", "gather_to_rank0", "drop_tied", "fill_tied", "full_model", "full_model_state_dict",
           "full_optimizer_state_dict", "initialized", "is_dtensor", "launch_mode", "load_full_model_state_dict",
           "load_full_optimizer_state_dict", "no_sync", "on_rank0", "prepare_model", "rank", "shard_model",
           "plain_class", "read_tensor_refs", "verify_active_set", "world", "wrap_model", "write_full_model",
           "write_full_optimizer"]

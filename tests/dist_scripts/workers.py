"""Worker functions run in N gloo processes by `launch` (torch.multiprocessing.spawn, localhost, free port).

Each worker writes what the test needs to `<out>/rank<r>.pt`; the test compares the files. Errors raised in
a worker (e.g. LisaError) reach the test as torch.multiprocessing.ProcessRaisedException with the traceback.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, *args, world: int = 2, timeout_s: int = 60) -> None:
    """Run fn(*args) on `world` gloo ranks; raises if any rank raised (its traceback in the message)."""
    mp.spawn(_entry, args=(world, free_port(), timeout_s, fn, args), nprocs=world, join=True)


def _entry(rank, world, port, timeout_s, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still talks can abort it
    finally:
        dist.destroy_process_group()


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a full plain tensor (collective for FSDP2 DTensors)."""
    return p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters()}


def build(mode: str, seed: int, lisa: dict, ddp_kwargs: dict | None = None, arch_layers: int = 6):
    """(plain model, module to call, LisaAdamW) for mode 'single', 'ddp' (LisaDDP) or 'fsdp' (FSDP2)."""
    from helpers import tiny_model
    from lisatune import LisaAdamW
    from lisatune.distributed import LisaDDP, shard_model
    model = tiny_model(n_layers=arch_layers, dtype=torch.bfloat16 if lisa.get("master_weights") else torch.float32)
    if mode == "fsdp":
        shard_model(model)
    opt = LisaAdamW(model, seed=seed, **lisa)
    run = LisaDDP(model, opt, comm_hook=(COMM, count_allreduce), **(ddp_kwargs or {})) if mode == "ddp" else model
    return model, run, opt


COMM = {"bytes": 0}  # gradient bytes all-reduced by DDP in this process


def count_allreduce(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(None, bucket)


def train_steps(run, opt, data, rank: int, world: int, model=None, snaps: list | None = None):
    """One optimizer step per global batch; each rank takes its 1/world slice (loss is a per-rank mean)."""
    for x in data:
        n = x.shape[0] // world
        xs = x[rank * n:(rank + 1) * n]
        run(input_ids=xs, labels=xs).loss.backward()
        opt.step()
        opt.zero_grad()
        if snaps is not None and opt.steps_done % opt.config.interval == 0:
            snaps.append(snapshot(model))


def train_worker(rank, world, out, mode, seeds, lisa, steps, batch):
    """Train `steps` global batches; save weights at every switch boundary, history and state bytes."""
    from helpers import batches
    model, run, opt = build(mode, seeds[rank], lisa)
    snaps = [snapshot(model)]
    peak = 0
    comm = []  # (gradient bytes all-reduced, bytes of the trainable params) per step
    data = batches(steps, seed=1, batch=batch)
    for x in data:
        before, trainable = COMM["bytes"], 4 * opt.trainable_parameters()
        train_steps(run, opt, [x], rank, world, model, snaps)
        comm.append((COMM["bytes"] - before, trainable))
        peak = max(peak, opt.state_bytes())
    torch.save({"snaps": snaps, "history": opt.history, "peak_state_bytes": peak, "comm": comm,
                "rewraps": getattr(run, "rewraps", None)}, Path(out) / f"rank{rank}.pt")


def resume_worker(rank, world, out, mode, lisa, steps, batch, stop):
    """The uninterrupted run; then train to `stop`, save_checkpoint, rebuild everything, load, train on."""
    from helpers import batches
    from lisatune.recipe.checkpoint import load_checkpoint, save_checkpoint
    data = batches(steps, seed=1, batch=batch)
    model, run, opt = build(mode, 0, lisa)
    train_steps(run, opt, data, rank, world)
    straight = {"final": snapshot(model), "history": opt.history}
    parked = {"straight": parked_kinds(opt)}
    del model, run, opt
    model, run, opt = build(mode, 0, lisa)
    train_steps(run, opt, data[:stop], rank, world)
    parked["saved"] = parked_kinds(opt)
    ck = save_checkpoint(Path(out) / "run", stop, model, opt, extra={"stop": stop})
    del model, run, opt
    model, run, opt = build(mode, 0, lisa, arch_layers=6)
    with torch.no_grad():  # scramble the fresh weights so that only the checkpoint can restore them
        for p in model.parameters():
            p.mul_(0.5)
    extra = load_checkpoint(ck, model, opt)
    assert extra["stop"] == stop and opt.steps_done == stop
    parked["loaded"] = parked_kinds(opt)
    train_steps(run, opt, data[stop:], rank, world)
    torch.save({"final": snapshot(model), "history": opt.history, "straight": straight, "parked": parked},
               Path(out) / f"resumed{rank}.pt")


def parked_kinds(opt) -> dict:
    """How the parked states' moments are held: {(class, device)}, how many, and whether each is this rank's
    shard of its parameter (shape of the parameter's local shard) when the parameter is sharded."""
    kinds, shard_shaped, n = set(), True, 0
    for name, st in opt.parked_states().items():
        p = opt.module.get_parameter(name)
        local = p.to_local() if hasattr(p, "to_local") else p
        for k, v in st.items():
            if k != "step" and torch.is_tensor(v):
                n += 1
                kinds.add((type(v).__name__, v.device.type))
                shard_shaped &= tuple(v.shape) == tuple(local.shape)
    return {"kinds": sorted(kinds), "n": n, "shard_shaped": shard_shaped, "specs": len(getattr(opt, "parked_shards", dict)())}


def load_worker(rank, world, out, mode, lisa):
    """Each rank loads its own optimizer checkpoint out/opt<rank>.pt (a test makes them disagree)."""
    model, run, opt = build(mode, 0, lisa)
    opt.load_state_dict(torch.load(Path(out) / f"opt{rank}.pt", weights_only=False))


def diverge_worker(rank, world, out, mode, lisa, steps, batch):
    """Rank 1's sampler goes its own way after the first interval (as a rank-local RNG would)."""
    from helpers import batches
    model, run, opt = build(mode, 0, lisa)
    if rank == 1:
        own = opt.sampler.active
        opt.sampler.active = lambda s: own(s) if s == 0 else own(s + 1000)
    train_steps(run, opt, batches(steps, seed=1, batch=batch), rank, world)


def slow_rank0_worker(rank, world, out, seconds):
    """Rank 0's on_rank0 work outlasts the process group's timeout while rank 1 waits for its result."""
    import time
    from lisatune.distributed import on_rank0
    on_rank0(lambda: time.sleep(seconds))


def full_state_worker(rank, world, out, lisa, steps, batch):
    """Gather the full optimizer state under FSDP2 while counting the gathered tensors alive at each gather."""
    import weakref
    from torch.distributed.tensor import DTensor
    from helpers import batches
    from lisatune.distributed import full_optimizer_state_dict
    model, run, opt = build("fsdp", 0, lisa)
    train_steps(run, opt, batches(steps, seed=1, batch=batch), rank, world)
    alive, most = [], [0]
    gather = DTensor.full_tensor

    def counted(self, *a, **k):
        most[0] = max(most[0], sum(r() is not None for r in alive))  # gathered earlier and still held
        t = gather(self, *a, **k)
        alive.append(weakref.ref(t))
        return t

    DTensor.full_tensor = counted
    try:
        sd = full_optimizer_state_dict(opt)
    finally:
        DTensor.full_tensor = gather
    parked = [(n, k, v) for n, st in sd["lisa"]["parked"].items() for k, v in st.items() if k != "step"]
    leaves = [v for st in sd["state"].values() for v in st.values()] + list(sd["lisa"].get("masters", {}).values()) + \
        [v for _, _, v in parked]
    whole = all(v is None or v.shape == model.get_parameter(n).shape for n, _, v in parked)  # (a DTensor: full)
    torch.save({"gathers": len(alive), "most_alive": most[0], "kinds": sorted({type(v).__name__ for v in leaves}),
                "devices": sorted({str(v.device) for v in leaves if torch.is_tensor(v)}), "parked": len(parked),
                "parked_whole": whole}, Path(out) / f"full{rank}.pt")


def load_state_worker(rank, world, out, lisa, steps, batch):
    """Save an FSDP2 checkpoint, then load it into a fresh run while counting the full (unsharded) state tensors
    the optimizer holds (bytes) at every point where load could put them (after torch's load, after parking, at each
    shard cut, at the end), and how optimizer.pt was read."""
    from helpers import batches
    from lisatune.distributed import fsdp
    from lisatune.engine import parking
    from lisatune.recipe import checkpoint
    from lisatune.recipe.checkpoint import load_checkpoint, save_checkpoint
    model, run, opt = build("fsdp", 0, lisa)
    train_steps(run, opt, batches(steps, seed=1, batch=batch), rank, world)
    before = local_states(opt)
    ck = save_checkpoint(Path(out) / "run", steps, model, opt)
    del model, run, opt
    model, run, opt = build("fsdp", 0, lisa)
    x = batches(1, seed=5, batch=batch)[0][rank * batch // world:(rank + 1) * batch // world]
    with torch.no_grad():  # as the recipe's packing probe: FSDP2's root unit is left unsharded
        model(input_ids=x, labels=x)
    most, cuts, reads = [0], [0], {}

    def sample(*_):
        most[0] = max(most[0], held_full(opt))

    real_cut, real_park, real_read = parking.shard_full, parking.Parking.load, checkpoint.read_torch

    def cut(p, v):
        sample()
        cuts[0] += 1
        return real_cut(p, v)

    def park(self, *a, **k):
        real_park(self, *a, **k)
        sample()

    def read(path, name, **k):
        reads[name] = k.get("mmap", False)
        return real_read(path, name, **k)

    fsdp.shard_full = parking.shard_full = cut
    parking.Parking.load, checkpoint.read_torch = park, read
    opt.inner.register_load_state_dict_post_hook(sample)
    try:
        load_checkpoint(ck, model, opt)
    finally:
        fsdp.shard_full, parking.shard_full = real_cut, real_cut
        parking.Parking.load, checkpoint.read_torch = real_park, real_read
    sample()
    gc.collect()
    maps = Path("/proc/self/maps")
    # nothing loaded holds a file of the checkpoint (optimizer.pt, its tensors' files, the model's)
    mapped = str(Path(ck).resolve()) in maps.read_text() if maps.exists() else False
    after = local_states(opt)
    same = before.keys() == after.keys() and all(
        torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    torch.save({"most_full_bytes": most[0], "cuts": cuts[0], "mmap": reads.get("optimizer.pt"), "same": same,
                "n_states": len(before), "mapped": mapped}, Path(out) / f"load{rank}.pt")


def local_states(opt) -> dict:
    """Every state tensor and master as this rank holds it (local shards), by parameter name and key."""
    out = {}
    for m, st in opt.state.items():
        out[_name(opt, m)] = {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in st.items()}
    for name, st in opt.parked_states().items():
        out["parked." + name] = {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in st.items()}
    for name, m in opt.masters().items():
        out["master." + name] = {"m": m.to_local().clone()}
    return out


def held_full(opt) -> int:
    """Bytes of the full (unsharded) state tensors and masters of sharded parameters the optimizer holds now."""
    def full_bytes(p, v):
        full = hasattr(p, "to_local") and torch.is_tensor(v) and not hasattr(v, "to_local") and v.shape == p.shape
        return v.numel() * v.element_size() if full else 0
    n = 0
    for t, st in opt.inner.state.items():
        n += sum(full_bytes(opt._param[_name(opt, t)], v) for v in st.values())
    for name, st in opt.parked_states().items():
        n += sum(full_bytes(opt._param[name], v) for v in st.values())
    n += sum(m.numel() * m.element_size() for m in opt.masters().values() if not hasattr(m, "to_local"))
    return n


def _name(opt, t) -> str:
    return next((n for n, m in opt.masters().items() if m is t), None) or opt.name_of(t)


def forward_first_worker(rank, world, out, lisa, steps, batch):
    """The same run twice under FSDP2: LisaAdamW built right after shard_model, and after a forward without grad
    (which leaves FSDP2's root unit unsharded, its parameters the gathered full tensors)."""
    from helpers import batches, tiny_model
    from lisatune import LisaAdamW
    from lisatune.distributed import shard_model
    data = batches(steps, seed=1, batch=batch)
    finals, sharded = [], []
    for first in (False, True):
        model = tiny_model(n_layers=6)
        shard_model(model)
        if first:
            x = data[0][rank * batch // world:(rank + 1) * batch // world]
            with torch.no_grad():
                model(input_ids=x, labels=x)
        opt = LisaAdamW(model, seed=0, **lisa)
        sharded.append(all(hasattr(p, "to_local") for g in opt.param_groups for p in g["params"]))
        train_steps(model, opt, data, rank, world)
        finals.append(snapshot(model))
    torch.save({"finals": finals, "sharded": sharded}, Path(out) / f"first{rank}.pt")


def load_after_forward_worker(rank, world, out, lisa, steps, batch):
    """load_full_optimizer_state_dict into a fresh FSDP2 run after a forward without grad (FSDP2's root unit is
    then unsharded); whether every local state, parked state and master equals the saved one."""
    from helpers import batches
    from lisatune.distributed import full_optimizer_state_dict, load_full_optimizer_state_dict
    model, run, opt = build("fsdp", 0, lisa)
    train_steps(run, opt, batches(steps, seed=1, batch=batch), rank, world)
    before = local_states(opt)
    box = [full_optimizer_state_dict(opt)]  # full on rank 0 only: every rank loads rank 0's
    dist.broadcast_object_list(box, src=0)
    model, run, opt = build("fsdp", 0, lisa)
    x = batches(1, seed=5, batch=batch)[0][rank * batch // world:(rank + 1) * batch // world]
    with torch.no_grad():
        model(input_ids=x, labels=x)
    load_full_optimizer_state_dict(opt, box[0])
    after = local_states(opt)
    same = before.keys() == after.keys() and all(
        torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    torch.save({"same": same}, Path(out) / f"direct{rank}.pt")


def streamed_model_worker(rank, world, out, lisa, steps, batch, shard_bytes, fail):
    """Save a checkpoint under FSDP2 with small model files, counting the gathered host copies alive at each
    gather; then load it into scrambled weights. With `fail`, rank 0's first model file cannot be written."""
    import errno
    import weakref
    from helpers import batches
    from lisatune.distributed import fsdp
    from lisatune.errors import LisaError
    from lisatune.recipe import checkpoint
    from lisatune.recipe.checkpoint import load_checkpoint, save_checkpoint
    fsdp.SHARD_BYTES = shard_bytes
    model, run, opt = build("fsdp", 0, lisa)
    train_steps(run, opt, batches(steps, seed=1, batch=batch), rank, world)
    before = snapshot(model)
    alive, most, gathers, in_model = [], [0], [0], [False]
    gather, write = fsdp._gather, fsdp.save_file
    streams = checkpoint.write_full_model, checkpoint.write_full_optimizer

    def counted(t, keep):  # the gathers of the streamed model and optimizer state
        full = gather(t, keep)
        if in_model[0]:
            most[0] = max(most[0], sum(r().nbytes for r in alive if r() is not None))  # copies still held
            gathers[0] += 1
            if full is not None:
                alive.append(weakref.ref(full))
        return full

    def streamed(stream):  # the model's and the optimizer's streaming: their gathers are counted
        def phase(*a, **k):
            in_model[0] = True
            try:
                return stream(*a, **k)
            finally:
                in_model[0] = False
        return phase

    def failing(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    fsdp._gather, fsdp.save_file = counted, failing if fail and rank == 0 else write
    checkpoint.write_full_model, checkpoint.write_full_optimizer = (streamed(f) for f in streams)
    try:
        ck = save_checkpoint(Path(out) / "run", steps, model, opt)
        error = None
    except LisaError as e:
        ck, error = None, str(e)
    finally:
        fsdp._gather, fsdp.save_file = gather, write
        checkpoint.write_full_model, checkpoint.write_full_optimizer = streams
    loaded = None
    if ck is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        load_checkpoint(ck, model, opt)
        after = snapshot(model)
        loaded = all(torch.equal(after[n], before[n]) for n in before)
    largest = max(p.numel() * 4 for p in model.parameters())  # an fp32 master or moment of the largest
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.save({"most_alive": most[0], "gathers": gathers[0], "largest": largest, "total": total,
                "files": sorted(f.name for f in ck.iterdir()) if ck is not None else None, "loaded": loaded,
                "error": error, "left": sorted(f.name for f in (Path(out) / "run" / "checkpoints").iterdir())},
               Path(out) / f"streamed{rank}.pt")

"""Measure the DDP options for LISA on 2 gloo processes (CPU). Not a test; numbers go to docs/distributed.md.

    python tests/dist_scripts/measure_ddp.py [steps] [hidden] [blocks] [option ...]

Options, each on the same model, data and LISA settings (gamma=2, K=5, AdamW):
  naive   DDP(model) built after LisaAdamW froze the model, never rebuilt
  unused  DDP(model, find_unused_parameters=True) built before the freeze (all params registered)
  skip    as unused, plus skip_all_reduce_unused_params=True
  static  DDP(model, static_graph=True) built before the freeze
  rewrap  lisatune.distributed.LisaDDP: a new DDP over the trainable params at each switch
Reported (rank 0): median step seconds (after 2 warm-up steps), all-reduced gradient bytes per step (a comm
hook counts the bucket buffers), total re-wrap seconds, whether the ranks hold identical weights at the end
and the largest difference from the rewrap run.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_scripts.workers import launch, snapshot  # noqa: E402

OPTIONS = ["rewrap", "naive", "unused", "skip", "static"]


def small_model(hidden: int, blocks: int):
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                        num_hidden_layers=blocks, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=256)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def worker(rank, world, out, option, steps, hidden, blocks):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lisatune import LisaAdamW
    from lisatune.distributed import LisaDDP

    counted = {"bytes": 0}

    def hook(state, bucket):
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    model = small_model(hidden, blocks)
    lisa = dict(n_layers=2, interval=5, lr=1e-3, seed=0)
    wrap_s = [0.0]
    if option in ("naive", "rewrap"):
        opt = LisaAdamW(model, **lisa)
        if option == "naive":
            run = DDP(model)
            run.register_comm_hook(counted, hook)
        else:
            orig = LisaDDP._wrap

            def timed(self, init_sync):
                t = time.perf_counter()
                orig(self, init_sync)
                if not init_sync:
                    wrap_s[0] += time.perf_counter() - t
            LisaDDP._wrap = timed
            run = LisaDDP(model, opt, comm_hook=(counted, hook))
    else:
        kw = {"unused": dict(find_unused_parameters=True),
              "skip": dict(find_unused_parameters=True, skip_all_reduce_unused_params=True),
              "static": dict(static_graph=True)}[option]
        run = DDP(model, **kw)
        run.register_comm_hook(counted, hook)
        opt = LisaAdamW(run, **lisa)
    g = torch.Generator().manual_seed(1)
    times, per_step = [], []
    error = None
    try:
        for step in range(steps):
            x = torch.randint(0, 2048, (8, 64), generator=g)[rank * 4:(rank + 1) * 4]
            before = counted["bytes"]
            t = time.perf_counter()
            run(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            per_step.append(counted["bytes"] - before)
    except Exception as e:  # report, do not hide: the option failed at this step
        error = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    snap = snapshot(model)
    flat = torch.cat([v.flatten() for v in snap.values()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    if error is None:
        dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(snap, Path(out) / f"{option}.pt")
        res = {"option": option, "error": error,
               "median_step_s": round(statistics.median(times[2:]), 4) if len(times) > 3 else None,
               "allreduce_MB_per_step": round(statistics.median(per_step) / 2**20, 3) if per_step else None,
               "rewrap_s_total": round(wrap_s[0], 4), "steps": len(times),
               "ranks_identical": error is None and torch.equal(gathered[0], gathered[1]),
               "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "active_params_M_now": round(opt.trainable_parameters() / 1e6, 2)}
        (Path(out) / f"{option}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    nums = [a for a in sys.argv[1:4] if a.isdigit()]
    steps, hidden, blocks = (int(a) for a in nums + ["30", "256", "8"][len(nums):])
    out = tempfile.mkdtemp()
    for option in [a for a in sys.argv[1:] if not a.isdigit()] or OPTIONS:
        try:
            launch(worker, out, option, steps, hidden, blocks, timeout_s=120)
        except Exception as e:
            print(json.dumps({"option": option, "launch_error": str(e).splitlines()[-1][:200]}), flush=True)
            continue
        res = json.loads((Path(out) / f"{option}.json").read_text())
        ref = Path(out) / "rewrap.pt"
        if ref.exists() and option != "rewrap":
            a, b = torch.load(ref), torch.load(Path(out) / f"{option}.pt")
            res["max_abs_diff_vs_rewrap"] = max((a[n] - b[n]).abs().max().item() for n in a)
        print(json.dumps(res), flush=True)

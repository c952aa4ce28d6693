"""FSDP2 + LisaAdamW on 2 gloo processes (CPU): per-rank optimizer-state bytes vs one process, step time.

    python tests/dist_scripts/measure_fsdp.py [steps] [hidden] [blocks]
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_scripts.measure_ddp import small_model  # noqa: E402
from dist_scripts.workers import launch  # noqa: E402


def run(model, opt, steps, rank, world):
    g = torch.Generator().manual_seed(1)
    times, peak = [], 0
    for _ in range(steps):
        x = torch.randint(0, 2048, (8, 64), generator=g)
        x = x[rank * 8 // world:(rank + 1) * 8 // world]
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        peak = max(peak, opt.state_bytes())
    return {"median_step_s": round(statistics.median(times[2:]), 4), "peak_state_bytes": peak,
            "history_state_bytes": [h["state_bytes"] for h in opt.history]}


def worker(rank, world, out, steps, hidden, blocks):
    from lisatune import LisaAdamW
    from lisatune.distributed import shard_model
    model = shard_model(small_model(hidden, blocks))
    opt = LisaAdamW(model, n_layers=2, interval=5, lr=1e-3)
    res = run(model, opt, steps, rank, world)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    from lisatune import LisaAdamW
    torch.set_num_threads(1)
    steps, hidden, blocks = (int(a) for a in (sys.argv[1:] + ["30", "256", "8"][len(sys.argv[1:]):]))
    model = small_model(hidden, blocks)
    single = run(model, LisaAdamW(model, n_layers=2, interval=5, lr=1e-3), steps, 0, 1)
    print(json.dumps({"single": single}), flush=True)
    out = tempfile.mkdtemp()
    launch(worker, out, steps, hidden, blocks, timeout_s=120)
    for r in range(2):
        res = json.loads((Path(out) / f"rank{r}.json").read_text())
        res["ratio_to_single"] = round(res["peak_state_bytes"] / single["peak_state_bytes"], 4)
        print(json.dumps({f"fsdp2_rank{r}": res}), flush=True)

"""The planner beyond one card (#27, #28): host memory as private RAM and mapped checkpoint pages, measured from
the process's own memory map; FSDP2's per-rank shards, measured on 3 gloo ranks; a Hub id planned offline from a
Hugging Face cache folder built here; one-line refusals."""
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as T

from dist_scripts.workers import launch
from lisatune import LisaAdamW
from lisatune.analysis.plan import Setting, model_config_for, plan_memory, run_plan
from lisatune.analysis.tiny import tiny_config
from lisatune.cli import main
from lisatune.errors import LisaError

BF16 = torch.bfloat16
PAGE = os.sysconf("SC_PAGE_SIZE")


def file_pages(path: str) -> dict[str, int]:
    """Rss and Private_Dirty (pages the process wrote: copies of its own) of this process's maps of `path`."""
    out, mine = {"Rss": 0, "Private_Dirty": 0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            mine = line.endswith(path)
        elif mine and line.split(":")[0] in out:
            out[line.split(":")[0]] += int(line.split()[1]) * 1024
    return out


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_host_private_is_the_trained_blocks_copies_and_the_rest_stays_mapped_checkpoint_pages(tmp_path):
    """A model loaded on the host maps its safetensors file; LISA with nf4 frozen blocks quantizes from those pages
    and a block that trains writes its own (copy-on-write: private) pages. Private_Dirty of the checkpoint's map
    grows by the planned per-block copy for each block trained, never for one that only froze."""
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).to(BF16).save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with open(path, "rb") as f:  # written back: its pages are clean, as a downloaded checkpoint's
        os.fsync(f.fileno())
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=BF16)
    opt = LisaAdamW(model, n_layers=1, interval=2, lr=1e-2, train_embedding=False, train_head=False,
                    frozen_weights="nf4", seed=0)
    assert file_pages(path)["Private_Dirty"] == 0  # quantizing read the pages, wrote none
    g = torch.Generator().manual_seed(0)
    trained = set()
    for _ in range(5):
        trained |= set(opt.active_blocks)
        x = torch.randint(0, 256, (1, 8), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    base = Setting(method="lisa", precision="bf16", gamma=1, embed_head=False, frozen="nf4", device="cpu",
                   batch=1, seq=8)
    p = plan_memory(str(tmp_path), replace(base, trained_blocks=len(trained)))
    dirty = file_pages(path)["Private_Dirty"]
    assert 2 <= len(trained) < 6 and p.host_private > 0
    # beyond the linears: each trained block's two norm vectors and the page edges of its tensors
    assert 0 <= dirty - p.host_private <= len(trained) * 4 * PAGE
    assert p.host_mapped == p.host_frozen - p.host_private > 0
    every = plan_memory(str(tmp_path), base)  # default: every block trained (a long run), nothing left mapped
    assert every.host_private == every.host_frozen and every.host_mapped == 0


def shards(rank, world, out):
    from lisatune.distributed import shard_model
    from helpers import tiny_model
    model = shard_model(tiny_model(n_layers=4, dtype=BF16))
    opt = LisaAdamW(model, n_layers=2, interval=100, lr=1e-3, master_weights=True)
    x = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        grads = sum(q.grad.to_local().numel() * q.grad.element_size() for q in model.parameters()
                    if q.grad is not None)
        opt.step()
        opt.zero_grad()
    if rank == 0:  # rank 0 holds the full ceil(rows / world) of each tensor; the last rank pads
        local = sum(q.to_local().numel() * q.element_size() for q in model.parameters())
        (Path(out) / "rank0.json").write_text(json.dumps({"weights": local, "grads": grads,
                                                          "masters": opt.master_bytes(),
                                                          "state": opt.state_bytes()}))


def test_fsdp_per_rank_shards_equal_three_gloo_ranks_and_the_transients_come_on_top(tmp_path):
    launch(shards, str(tmp_path), world=3, timeout_s=120)  # 3 ranks: 96, 32 and 64 rows do not split evenly
    got = json.loads((tmp_path / "rank0.json").read_text())
    base = Setting(method="lisa", precision="bf16-mixed", batch=1, seq=8, attention="eager", device="cpu")
    p = plan_memory(tiny_config("llama", 4), replace(base, distributed="fsdp", world=3))
    assert (p.weights, p.grads, p.masters, p.state) == (got["weights"], got["grads"], got["masters"], got["state"])
    one = plan_memory(tiny_config("llama", 4), base)
    assert p.weights < one.weights / 2 and p.state < one.state / 2 and p.buckets == 0
    assert p.gathered > 0 and p.fwd_bwd >= p.static + p.grads + p.gathered


@pytest.mark.parametrize("change,field", [
    ({"frozen": "nf4"}, "lisa.frozen_weights: nf4"),
    ({"eh_state": "8bit"}, "lisa.embed_head_state: 8bit"),
    ({"world": 1}, "--world 1"),
    ({"method": "lora"}, "method lora"),
    ({"method": "full"}, "train.precision: bf16-mixed")])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(change, field):
    with pytest.raises(LisaError) as e:
        replace(Setting(precision="bf16-mixed", distributed="fsdp", world=4), **change).check()
    assert field in str(e.value) and "\n" not in str(e.value)


def hub_cache(root: Path, repo: str, config) -> Path:
    """A Hugging Face cache folder as huggingface_hub writes it: refs/main naming a snapshot with config.json."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    config.to_json_file(snap / "config.json")
    return root


def test_a_hub_id_plans_offline_from_the_hugging_face_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "someone/tiny-llama", tiny_config("llama", 4))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, cfg = model_config_for("someone/tiny-llama")
    assert name == "someone/tiny-llama" and cfg.num_hidden_layers == 4 and cfg.model_type == "llama"
    s = Setting(batch=1, seq=8, device="cpu")
    assert plan_memory("someone/tiny-llama", s).to_dict() == plan_memory(tiny_config("llama", 4), s).to_dict()
    assert main(["plan", "--model", "someone/tiny-llama", "--method", "lisa", "--seq", "8"]) == 0
    assert capsys.readouterr().out.startswith("### someone/tiny-llama (")
    with pytest.raises(LisaError) as e:  # neither built in nor cached: one line naming the id
        run_plan("someone/not-downloaded", ["lisa"], s)
    assert "someone/not-downloaded" in str(e.value) and "Hugging Face cache" in str(e.value)
    assert "\n" not in str(e.value)


def test_host_columns_and_the_setup_peak_in_the_table():
    r = run_plan("SmolLM2-135M", ["lisa:embed_head=false,frozen=nf4"], Setting(precision="bf16-mixed",
                                                                              trained_blocks=2))
    p = r["plans"][0]
    assert "| host RAM | host mapped |" in r["markdown"] and "assumed: 2, --trained-blocks" in r["markdown"]
    assert p.host_private + p.host_mapped == p.host_frozen and p.host_private == 2 * p.host_frozen // 30
    assert p.weights < p.setup < p.setup_whole and "setup peak" in r["markdown"]

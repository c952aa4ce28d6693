"""#27: trained blocks' full-precision copies spilled to files (lisa.spill_dir), and the host RAM check at setup."""
import re
from pathlib import Path

import pytest
import torch

from helpers import batches, make_run_assets, tiny_model, train
from lisatune import LisaAdamW
from lisatune.analysis.plan import Setting, parse_setting, plan_memory
from lisatune.errors import LisaError
from lisatune.quant.frozen import copy_bytes
from lisatune.recipe import host_memory, loop
from lisatune.recipe.config import load_config
from test_errors import assert_one_line, cli, snapshot, write_config


def maps(folder: Path) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of files in `folder`."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(folder)):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


def written(folder: Path) -> int:
    """Private_Dirty bytes of this process's mappings of `folder`'s files: pages written, i.e. private RAM."""
    total, mine = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            mine = str(folder) in line
        elif mine and line.startswith("Private_Dirty:"):
            total += int(line.split()[1]) * 1024
    return total


def mapped_in(t: torch.Tensor, regions) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi, _ in regions)


def run(kind, spill, steps=9, dtype=torch.float32, **kw):
    model = tiny_model(n_layers=4, dtype=dtype)
    opt = LisaAdamW(model, n_layers=1, interval=2, lr=1e-2, frozen_weights=kind, seed=1, spill_dir=spill, **kw)
    trained = set(opt.active_blocks)
    for x in batches(steps):
        train(model, opt, [x])
        trained |= set(opt.active_blocks)
    return model, opt, trained


@pytest.mark.parametrize("kind, dtype, masters", [("nf4", torch.float32, False), ("int8", torch.float32, False),
                                                  ("nf4", torch.bfloat16, True)])
def test_spilled_copies_train_bitwise_as_in_ram_and_are_mapped_pages_not_ram(tmp_path, kind, dtype, masters):
    spill = tmp_path / "spill"
    ref, _, _ = run(kind, None, dtype=dtype, master_weights=masters)
    model, opt, trained = run(kind, spill, dtype=dtype, master_weights=masters)
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same training, to the bit
    regions = maps(spill)
    frozen_trained = [i for i in trained if i not in opt.active_blocks]
    assert frozen_trained and regions
    host = opt.frozen_weights.host
    for i in range(4):
        names = [n for n in host if n.startswith(f"model.layers.{i}.")]
        assert names
        # a block that trained and froze is its file's mapped pages; one never trained is the model's own tensor;
        # the active block trains a private copy (never written into a mapping)
        assert all(mapped_in(host[n], regions) == (i in frozen_trained) for n in names), i
    assert written(spill) == 0  # no page of the spilled files was written: none is private RAM
    assert list(spill.iterdir()) == []  # unlinked at once: nothing left behind
    assert all(p.endswith("(deleted)") for _, _, p in regions)


def test_a_resume_loads_frozen_blocks_into_spilled_files_and_continues_bitwise(tmp_path):
    spill, data = tmp_path / "spill", batches(10)

    def setup(folder):
        model = tiny_model(n_layers=4)
        return model, LisaAdamW(model, n_layers=1, interval=3, lr=1e-2, frozen_weights="nf4", seed=2,
                                spill_dir=folder)

    model, opt = setup(None)
    train(model, opt, data)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = setup(spill)
    train(model, opt, data[:4])
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    model, opt = setup(spill)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    regions = maps(spill)
    frozen = [n for n in opt.frozen_weights.host if int(n.split(".")[2]) not in opt.active_blocks]
    assert frozen and all(mapped_in(opt.frozen_weights.host[n], regions) for n in frozen)  # loaded into files
    assert written(spill) == 0
    train(model, opt, data[4:])
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_a_spill_folder_that_cannot_be_written_is_one_line_naming_the_field(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LisaError, match=r"^lisa.spill_dir: cannot write block\d's full-precision weights to "):
        run("nf4", blocker / "spill", steps=3)


def test_spill_dir_without_quantized_frozen_blocks_is_refused_when_the_config_loads(tmp_path, capsys):
    assets = make_run_assets(tmp_path / "assets")
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--set", f"lisa.spill_dir={tmp_path}/s")[::2],
                    "lisa.spill_dir: holds the full-precision copies of quantized frozen blocks: set frozen_weights")


def test_the_planner_counts_at_most_gamma_plus_one_private_copies_with_spill():
    base = Setting(precision="bf16-mixed", device="cpu", batch=1, seq=16)
    plain = plan_memory("Llama-3.2-1B", parse_setting("lisa:frozen=nf4", base))
    spilled = plan_memory("Llama-3.2-1B", parse_setting("lisa:frozen=nf4,spill=true", base))
    per_block = plain.host_frozen // 16  # 16 equal blocks
    assert plain.host_private == 16 * per_block and spilled.host_private == 3 * per_block  # γ = 2: 2 + 1
    assert spilled.host_private + spilled.host_mapped == plain.host_frozen
    with pytest.raises(LisaError, match="spill holds quantized frozen blocks' copies"):
        parse_setting("lisa:spill=true", base)


# -- the host RAM check at setup -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def block_bytes():
    model = tiny_model(n_layers=4)  # the assets' model has the same blocks
    return copy_bytes(model.model.layers[0])


def test_trained_blocks_counts_gamma_per_interval_and_every_block_on_resume():
    assert host_memory.trained_blocks(80, 2, 20, 100, resumed=False) == 10
    assert host_memory.trained_blocks(80, 2, 20, 101, resumed=False) == 12
    assert host_memory.trained_blocks(80, 2, 1, 3000, resumed=False) == 80
    assert host_memory.trained_blocks(80, 2, 20, 10, resumed=True) == 80


def test_a_run_whose_host_copies_do_not_fit_is_refused_before_it_trains(tmp_path, assets, capsys, monkeypatch):
    # γ = 2, K = 3, 6 steps: 4 of 4 blocks train; the machine "has" 3.5 blocks' worth
    avail = int(3.5 * block_bytes())
    monkeypatch.setattr(host_memory, "available_host_ram", lambda: avail)
    cfg = write_config(tmp_path, assets, max_steps=6)
    before = snapshot(tmp_path)
    line = assert_one_line(*cli(capsys, "train", cfg, "--set", "lisa.frozen_weights=nf4")[::2],
                           "lisa.frozen_weights: nf4 keeps a private full-precision copy of each block that trains "
                           "on the host: 4 of 4 blocks train in this run's 6 steps")
    assert "set lisa.spill_dir to a folder" in line and "train.check_host_ram: false" in line
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before
    # with a spill folder γ + 1 = 3 blocks stay in RAM: it fits, and trains
    spill = tmp_path / "spill"
    loop.train(load_config(str(cfg), ["lisa.frozen_weights=nf4", f"lisa.spill_dir={spill}"]))
    assert (tmp_path / "run" / "final").is_dir() and list(spill.iterdir()) == []
    # 2 steps (one interval): 2 blocks train, fits without one
    loop.train(load_config(str(cfg), ["lisa.frozen_weights=nf4", "train.max_steps=2", "train.overwrite=true"]))
    # the opt-out
    loop.train(load_config(str(cfg), ["lisa.frozen_weights=nf4", "train.check_host_ram=false",
                                      "train.overwrite=true"]))


def test_spill_that_still_does_not_fit_and_offloaded_state_are_one_line_each(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.setattr(host_memory, "available_host_ram", lambda: block_bytes())
    cfg = write_config(tmp_path, assets, max_steps=6)
    assert_one_line(*cli(capsys, "train", cfg, "--set", "lisa.frozen_weights=nf4", "--set",
                         f"lisa.spill_dir={tmp_path}/s")[::2],
                    "lisa.spill_dir: with a spill folder, γ + 1 = 3 blocks' full-precision copies are still host RAM")
    monkeypatch.setattr(host_memory, "available_host_ram", lambda: 1000)
    assert_one_line(*cli(capsys, "train", cfg, "--set", "lisa.state_policy=offload")[::2],
                    "lisa.state_policy: offload parks the optimizer state of each block that trained and froze on "
                    "the host: 4 of 4 blocks train")
    assert not (tmp_path / "run").exists()

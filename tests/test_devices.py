"""Device invariants of the CUDA path, guarded on CPU: a model moved after the optimizer was built is one
line at the next step; the Trainer path puts the model on its device first and refuses several processes;
offloading parked state never moves AdamW's `step` counter (fused/capturable AdamW keep it on the device)."""
import pytest
import torch
import transformers as T
from helpers import batches, tiny_model, train

from lisatune import LisaAdamW, LisaError
from lisatune.recipe.meter import reachable_tensors
from lisatune.engine.parking import Parking
from lisatune.integrations.hf_trainer import lisa_optimizers
from lisatune.methods import build_method


@pytest.mark.parametrize("master", [False, True])
def test_a_model_moved_after_the_optimizer_was_built_is_one_line_at_the_next_step(master):
    model = tiny_model(n_layers=3, dtype=torch.bfloat16 if master else torch.float32)
    opt = LisaAdamW(model, n_layers=1, interval=2, lr=1e-3, master_weights=master)
    train(model, opt, batches(1))
    model.to("meta")  # stands for .to("cuda") after the optimizer exists
    with pytest.raises(LisaError, match=r"^the model moved to meta after LisaAdamW was built on cpu: build the "
                                        r"optimizer after model.to\(device\)$"):
        opt.step()


def test_the_trainer_path_moves_the_model_first_and_refuses_several_processes(tmp_path, monkeypatch):
    args = T.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    model = tiny_model(n_layers=2)
    moved = []
    monkeypatch.setattr(type(model), "to", lambda self, *a, **k: moved.append(a) or self)
    opt, _ = lisa_optimizers(model, args, n_layers=1, interval=2)
    assert moved == [(args.device,)] and opt.steps_done == 0
    monkeypatch.setattr(T.TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(LisaError, match=r"^lisa_optimizers: the Trainer under 2 processes would not synchronise"):
        lisa_optimizers(tiny_model(n_layers=2), args, n_layers=1, interval=2)


def test_offload_leaves_the_step_counter_where_the_optimizer_keeps_it():
    step = torch.tensor(3.0, device="meta")  # stands for fused AdamW's counter on the GPU: it must not move
    parking = Parking("offload")
    parking.park("w", {"step": step, "exp_avg": torch.ones(2)})
    assert parking.states["w"]["step"] is step
    back = parking.restore("w", torch.zeros(2))
    assert back["step"] is step and torch.equal(back["exp_avg"], torch.ones(2)) and not parking.states


def tensors_off_their_device(opt) -> list[str]:
    """Every tensor reachable from each parameter's optimizer state (projector objects included) that is not on
    that parameter's device; `step` counters may stay on the host, as torch keeps them."""
    return [f"{k}: {t.device}" for p, st in opt.state.items() for k, v in st.items() if k != "step"
            for t in reachable_tensors(v) if t.device != p.device]


@pytest.mark.parametrize("method, options", [("galore", {"rank": 8, "update_proj_gap": 2}), ("lisa", {}),
                                             ("lisa", {"embed_head_state": "8bit"}), ("lisa", {"state_policy": "keep"})])
def test_after_loading_every_state_tensor_is_on_its_parameters_device(method, options):
    m = build_method(method, {"n_layers": 2, "interval": 2, **options} if method == "lisa" else options)
    model = m.prepare(tiny_model(n_layers=4))
    opt = m.optimizer(model, 1e-3)
    train(model, opt, batches(3))
    sd = opt.state_dict()
    again = m.prepare(tiny_model(n_layers=4)).to("meta")  # stands for the GPU the resumed run is on
    resumed = m.optimizer(again, 1e-3)
    resumed.load_state_dict(sd)
    assert resumed.state and tensors_off_their_device(resumed) == []


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_frozen_blocks_are_quantized_straight_onto_the_device_and_never_moved_in_full(kind, monkeypatch):
    """#27: LisaAdamW(device=...) on a model given on the host quantizes each frozen block's linears onto the
    device, then moves the rest: no full-precision frozen weight is ever in the model that is moved, and a
    frozen block's full-precision copy is the host weight itself (no second copy)."""
    from lisatune.quant import frozen
    model = tiny_model(n_layers=4)
    host = {n: p for n, p in model.named_parameters()}
    quantized_to, moved = [], []
    real_quantize, real_to = frozen.quantized_weight, torch.nn.Module.to

    def quantize(bnb, w, k, device):
        quantized_to.append(str(device))
        return real_quantize(bnb, w, k, "cpu")  # (the stand-in device is the host)

    def to(self, *args, **kwargs):
        if self is model:
            moved.append({id(p) for p in self.parameters()})
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(frozen, "quantized_weight", quantize)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    opt = LisaAdamW(model, n_layers=1, interval=2, lr=1e-3, frozen_weights=kind, device="cpu", seed=0)
    frozen_blocks = [i for i in range(4) if i not in opt.active_blocks]
    full = {n for n in host for i in frozen_blocks if n.startswith(f"model.layers.{i}.") and n.endswith("proj.weight")}
    assert len(frozen_blocks) == 3 and len(full) == 3 * 7 and quantized_to == ["cpu"] * len(full)
    assert len(moved) == 1 and not moved[0] & {id(host[n]) for n in full}
    assert all(opt.frozen_weights.host[n].data_ptr() == host[n].data_ptr() for n in full)  # no copy
    train(model, opt, batches(4))  # trains on through switches


def test_lisatune_train_builds_lisa_on_the_device_and_other_methods_after_moving_the_model(monkeypatch):
    """The recipe passes the device to method.optimizer: LISA with quantized frozen blocks takes it (and quantizes
    onto it), every other method moves the model first."""
    model = tiny_model(n_layers=2)
    moves = []
    monkeypatch.setattr(type(model), "to", lambda self, *a, **k: moves.append(a) or self)
    nf4 = build_method("lisa", {"n_layers": 1, "interval": 2, "frozen_weights": "nf4"})
    assert nf4.place(model, "cpu") == {"device": "cpu"} and moves == []
    assert build_method("lisa", {"n_layers": 1}).place(model, "cpu") == {} and moves == [("cpu",)]
    assert build_method("full").place(model, "cpu") == {} and moves == [("cpu",), ("cpu",)]
    opt = nf4.optimizer(tiny_model(n_layers=2), 1e-3, device="cpu")
    assert opt.frozen_weights.quantized_blocks() == [i for i in range(2) if i not in opt.active_blocks]

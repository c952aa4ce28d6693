"""The fused (chunked) head + cross-entropy equals each model's own loss and gradients, and holds no logits."""
import pytest
import torch
import transformers as T

from helpers import ARCHS, tiny_model
from lisatune.recipe import loss as L


def labelled_batch(vocab=96, batch=3, seq=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding
    labels = ids.clone()
    labels[:, :7] = L.IGNORE  # prompt tokens carry no loss
    labels[mask == 0] = L.IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_loss_and_gradients_equal_the_models_own(arch, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 96 * 5)  # 5 rows per chunk: several chunks, a ragged last one
    model, batch = tiny_model(arch, n_layers=2), labelled_batch()
    assert L.check_fused(model, batch) is None
    ref = L.standard_loss(model, **batch)
    ref.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    got = L.fused_loss(model, **batch)
    got.backward()
    have = grads(model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert have.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    s_ref, s_got = L.standard_loss(model, **batch, reduction="sum"), L.fused_loss(model, **batch, reduction="sum")
    torch.testing.assert_close(s_got, s_ref, rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_the_blocks_still_get_theirs():
    model, batch = tiny_model("llama", n_layers=2), labelled_batch()
    model.lm_head.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    L.standard_loss(model, **batch).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    L.fused_loss(model, **batch).backward()
    have = grads(model)
    assert "lm_head.weight" not in have and have.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-4, atol=1e-6)


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total), max(total)


def test_the_fused_loss_holds_no_logits_for_backward():
    cfg = ARCHS["llama"](2)
    cfg.vocab_size = 8192  # the head dominates, as in a real model
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    batch = labelled_batch(vocab=8192, batch=2, seq=64)
    logits_bytes = 2 * 64 * 8192 * 4
    _, std, std_max = saved_bytes(lambda: L.standard_loss(model, **batch))
    _, fused, fused_max = saved_bytes(lambda: L.fused_loss(model, **batch))
    assert std_max >= logits_bytes and std - fused >= logits_bytes  # at least one full logits tensor fewer
    assert fused_max <= 8192 * 32 * 4  # the largest thing held is the head's gradient, not logits


def test_a_model_with_extra_logit_processing_falls_back_to_its_own_loss():
    cfg = T.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    batch = labelled_batch()
    why = L.check_fused(model, batch)
    assert why is not None and "fused loss" in why
    assert L.pick_loss(model, batch, fused=True) is L.standard_loss
    assert L.pick_loss(tiny_model("llama", 2), batch, fused=True) is L.fused_loss
    assert L.pick_loss(tiny_model("llama", 2), batch, fused=False) is L.standard_loss


def test_under_no_grad_the_fused_loss_computes_no_gradients(monkeypatch):
    model, batch = tiny_model("llama", n_layers=2), labelled_batch()
    made = []
    real = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda t, **k: made.append(t.shape) or real(t, **k))
    with torch.no_grad():
        a = L.fused_loss(model, **batch)
    assert made == [] and not a.requires_grad
    b = L.fused_loss(model, **batch)
    assert made and b.requires_grad and torch.equal(a, b.detach())


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_under_ddp_the_fused_loss_runs_the_wrappers_forward_and_equals_the_models_own(arch, one_process_group,
                                                                                      monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 96 * 5)
    model, batch = tiny_model(arch, n_layers=2), labelled_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mode = model.training
    ddp.train(not mode)  # the wrapper's flag is not the model's: the check restores the model's own
    model.train(mode)
    assert L.unwrap(ddp) is model and L.check_fused(ddp, batch) is None
    assert model.training == mode
    ref = L.standard_loss(model, **batch)
    ref.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    calls = []
    ddp.register_forward_pre_hook(lambda m, a, k: calls.append(sorted(k)), with_kwargs=True)
    got = L.fused_loss(ddp, **batch)  # DDP's forward prepares the reducer; its hooks all-reduce in backward
    got.backward()
    have = grads(model)
    assert calls == [["attention_mask", "input_ids", "logits_to_keep", "output_hidden_states"]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert have.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-4, atol=1e-6, msg=n)

"""`del model, opt` frees the model at once, without the garbage collector: no reference cycle through the
optimizer, its switch hooks or the quantized frozen blocks keeps a case of a benchmark alive into the next."""
import gc
import weakref

import pytest
import torch
from helpers import batches, tiny_model, train

from lisatune import LisaAdamW
from lisatune.methods import build_method

BF16 = torch.bfloat16
CASES = {
    "lisa": dict(),
    "lisa offload": dict(state_policy="offload"),
    "lisa bf16-mixed": dict(master_weights=True),
    "lisa nf4": dict(frozen_weights="nf4"),
    "lisa int8": dict(frozen_weights="int8"),
    "lisa 8-bit E/H": dict(embed_head_state="8bit"),
    "lisa module units, warm-up": dict(units="module", activation_warmup=1),
}


def freed_without_gc(build) -> bool:
    # The first model built in a process outlives its caller (the frames of that first build stay referenced
    # from inside the libraries, seen with gc.get_referrers): build one first, so that the measured one is not it.
    tiny_model(n_layers=1)
    gc.collect()
    gc.disable()
    try:
        model, opt = build()
        train(model, opt, batches(3))
        block = weakref.ref(next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")))
        del model, opt
        return block() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("case", CASES)
def test_lisa_frees_the_model_without_the_garbage_collector(case):
    options = dict(CASES[case])
    dtype = BF16 if options.get("master_weights") else torch.float32

    def build():
        model = tiny_model(n_layers=4, dtype=dtype)
        return model, LisaAdamW(model, n_layers=1, interval=2, lr=1e-3, **options)

    assert freed_without_gc(build)


@pytest.mark.parametrize("method, precision", [("full", "fp32"), ("full", "bf16-mixed"), ("lora", "fp32"),
                                               ("lisa", "bf16-mixed")])
def test_every_method_frees_the_model_without_the_garbage_collector(method, precision):
    mixed = precision == "bf16-mixed"

    def build():
        m = build_method(method)
        model = m.prepare(tiny_model(n_layers=4, dtype=BF16 if mixed else torch.float32))
        return model, m.optimizer(model, 1e-3, master_weights=mixed)

    assert freed_without_gc(build)


def test_the_check_sees_a_cycle():
    """A model kept in a cycle (as the frozen-weights helper's lambda once did) is reported."""
    def build():
        model = tiny_model(n_layers=2)
        next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")).loop = [model]  # a plain attribute: a cycle block -> list -> model -> block
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    assert not freed_without_gc(build)

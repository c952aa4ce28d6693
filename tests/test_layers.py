"""Layer discovery: every HF causal LM splits into blocks, embedding, head and norm, each parameter once."""
import pytest
import torch
import transformers as T
from torch import nn

from helpers import ARCHS, tiny_model
from lisatune import LisaError, find_layers

EXPECTED_PATH = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                 "gemma": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
                 "opt": "model.decoder.layers", "phi": "model.layers"}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_splits_into_units(arch):
    model = tiny_model(arch, n_layers=3)
    lm = find_layers(model)
    assert lm.blocks_path == EXPECTED_PATH[arch]
    assert lm.n_blocks == 3
    emb = model.get_input_embeddings().weight
    assert any(p is emb for _, p in lm.embedding)
    head = model.get_output_embeddings().weight
    assert lm.tied == (head is emb)
    if not lm.tied:
        assert any(p is head for _, p in lm.head)
    assert lm.norm, "the final norm is found"
    assert all("norm" in n or "ln_f" in n for n, _ in lm.norm)
    # each parameter in exactly one unit, none left out
    units = lm.embedding + lm.head + lm.norm + lm.other + [x for b in lm.blocks for x in b]
    assert sorted(id(p) for _, p in units) == sorted(id(p) for p in model.parameters())
    assert not lm.other


def test_learned_position_embeddings_count_as_embedding():
    lm = find_layers(tiny_model("gpt2", 2))
    assert {n for n, _ in lm.embedding} == {"transformer.wte.weight", "transformer.wpe.weight"}


def test_vlm_picks_the_language_model_blocks_not_the_vision_tower():
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = ARCHS["llama"](3)
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=95))
    lm = find_layers(model)
    assert lm.blocks_path == "model.language_model.layers"
    assert lm.n_blocks == 3
    assert any(n.startswith("model.vision_tower.") for n, _ in lm.other)
    assert not any("vision" in n for n, _ in lm.norm + lm.embedding)


def test_override_path_is_resolved_with_getattr():
    model = tiny_model("llama", 3)
    assert find_layers(model, "model.layers").blocks[1][0][0].startswith("model.layers.1.")


def test_override_path_that_does_not_exist_lists_candidates():
    with pytest.raises(LisaError, match=r"blocks_path 'model.layerz' not found.*model.layers \(3 x LlamaDecoderLayer\)"):
        find_layers(tiny_model("llama", 3), "model.layerz")


def test_override_path_must_be_a_block_list():
    with pytest.raises(LisaError, match="is a LlamaRMSNorm, not a non-empty list"):
        find_layers(tiny_model("llama", 3), "model.norm")


def test_override_path_is_not_evaluated():
    with pytest.raises(LisaError, match="not found"):
        find_layers(tiny_model("llama", 2), "__class__.__init__.__globals__")


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.b = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_ambiguous_block_lists_are_an_error_that_lists_them():
    with pytest.raises(LisaError, match=r"ambiguous transformer blocks in TwoTowers: a \(2 x Linear\), b \(2 x Linear\)"):
        find_layers(TwoTowers())


def test_no_block_list_is_an_error():
    with pytest.raises(LisaError, match="could not find the transformer blocks of Linear"):
        find_layers(nn.Linear(2, 2))


def test_moe_expert_lists_are_not_mistaken_for_blocks():
    cfg = T.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    lm = find_layers(T.AutoModelForCausalLM.from_config(cfg))
    assert lm.blocks_path == "model.layers" and lm.n_blocks == 2

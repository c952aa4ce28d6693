"""Tiny models built from configs (no network), shared by the tests."""
import json
import os
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

torch.set_num_threads(1)  # tiny models: threads only contend on the 2 shared cores

ARCHS = {
    "llama": lambda n: T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": lambda n: T.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                         num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda n: T.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                     num_attention_heads=4, num_key_value_heads=2),
    "gemma": lambda n: T.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gpt2": lambda n: T.GPT2Config(vocab_size=96, n_embd=32, n_layer=n, n_head=4, n_positions=128,
                                   bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda n: T.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                          num_attention_heads=4),
    "opt": lambda n: T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=n, num_attention_heads=4,
                                 word_embed_proj_dim=32, max_position_embeddings=128),
    "phi": lambda n: T.PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                                 num_attention_heads=4),
}


def tiny_model(arch: str = "llama", n_layers: int = 6, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = ARCHS[arch](n_layers)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    return model.eval()  # no dropout: runs are deterministic


def batches(n: int, seed: int = 0, batch: int = 2, seq: int = 12, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


@pytest.fixture
def model():
    return tiny_model()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EOS = "<|endoftext|>"  # deliberately not <|im_end|>, so appending EOS is visible


def tiny_tokenizer(chat: bool):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, "<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is the sum of two and three? The answer is five.",
                            "Instruction: write a haiku about the sea. Response: waves."], trainer=trainer)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token="<pad>")
    tok.chat_template = CHATML if chat else None
    return tok


# A whole `lisatune train` run in seconds: a tiny llama + tokenizer saved as a HF directory, and alpaca data.
RECORDS = [{"instruction": f"Add {a} and {b}.", "output": f"The answer is {a + b}."} for a in range(6) for b in range(4)]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on the shared cores


def make_run_assets(root):
    tok = tiny_tokenizer(chat=True)
    cfg = ARCHS["llama"](4)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root

"""The offline assets the framework recipes train on: a tiny Llama (config + random weights), a word-level tokenizer
and an alpaca-format dataset, all built locally (no hub access), deterministic from fixed seeds."""

from __future__ import annotations

import json
import os
import random

_TEXT = (
    "the a model learns to resume training from a valid checkpoint after a crash and continues exactly where it "
    "stopped with the same data order and random state so the run ends bitwise equal"
)
WORDS = tuple(_TEXT.split())


def build_dataset(root: str, n: int = 96) -> str:
    """``root/data``: ``dataset_info.json`` naming ``tiny`` and ``tiny.json`` (instruction / input / output)."""
    rng = random.Random(0)
    rows = [
        {
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))),
            "input": "",
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))),
        }
        for _ in range(n)
    ]
    d = os.path.join(root, "data")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tiny.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(d, "dataset_info.json"), "w") as f:
        json.dump({"tiny": {"file_name": "tiny.json"}}, f)
    return d


def build_model(root: str) -> str:
    """``root/tiny-llama``: a 2-layer Llama (hidden 32) with a word-level tokenizer over :data:`WORDS`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = os.path.join(root, "tiny-llama")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)) + [":", "Human", "Assistant", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d

"""Tiny random HF model configs for the tests (imported as `tiny_models`; tests/ is on the
path through tests/conftest.py): one builder with every number written out, shared by
the export, token, generation and loading tests. benchmarks/_selftest.py keeps its own
2-layer BERT: it runs as `python -m benchmarks._selftest`, without tests/ on the path."""

from __future__ import annotations

from typing import Any

VOCAB = 30522  # the MiniLM (bert-base-uncased) tokenizer is reused for every family
FAMILIES = ["bert", "roberta", "llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt"]


def _defaults(family: str) -> dict[str, Any]:
    """The tiny shape of each family: width 32, 3 layers, 4 heads (2 kv heads where the
    family has grouped-query attention), MLP 64."""
    if family in ("bert", "roberta"):
        extra = {"pad_token_id": 0, "max_position_embeddings": 260} if family == "roberta" else {}
        return dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=64, **extra)  # fmt: skip
    if family in ("llama", "qwen2", "mistral"):
        return dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64,
                    max_position_embeddings=256)  # fmt: skip
    if family == "gpt2":
        return dict(n_embd=32, n_layer=3, n_head=4, n_positions=256)
    if family == "gpt_neox":  # fused qkv projection, split in the graph
        return dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    if family == "opt":
        return dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=256, word_embed_proj_dim=32)  # fmt: skip
    raise ValueError(f"no tiny config for family {family!r}: one of {FAMILIES}")


def tiny_config(family: str, **overrides: Any):
    """The transformers config of a tiny ``family`` model (one of FAMILIES), vocabulary
    VOCAB; ``overrides`` replace any of its numbers (e.g. ``vocab_size=64``)."""
    import transformers as tf

    classes = {
        "bert": tf.BertConfig, "roberta": tf.RobertaConfig, "llama": tf.LlamaConfig,
        "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "gpt2": tf.GPT2Config,
        "gpt_neox": tf.GPTNeoXConfig, "opt": tf.OPTConfig,
    }  # fmt: skip
    return classes[family](**{"vocab_size": VOCAB, **_defaults(family), **overrides})

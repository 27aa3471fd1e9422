"""Tiny random Llama models with a small trained BPE tokenizer, and bundles of them with
generation graphs, for the generation tests (imported as `gen_helpers`; the device tests
add this folder to sys.path). Built once per machine under the fedmobillm cache."""

from __future__ import annotations

import shutil
from pathlib import Path

VERSION = "v3"  # bump when the builders below change
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?",
    "a model writes text one token at a time",
    "phones federate a language model and keep their own text",
]
PROMPTS = ["the quick brown", "hello world", "a model writes"]
PTE_CONTEXT = 24  # the .pte step's KV cache in the test bundles: small, so tests reach it


def tiny_llama(tied: bool = True) -> Path:
    """A saved LlamaForCausalLM folder (3 blocks x 32, 4 heads / 2 kv, seeded random
    weights, scaled up so the logits have no near-ties) with a 300-token BPE tokenizer."""
    from fedmobillm.paths import cache_dir

    out = cache_dir() / "test-models" / f"tiny-llama-gen-{'tied' if tied else 'untied'}-{VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(tmp, tied)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _build(out: Path, tied: bool) -> None:
    import torch
    from tiny_models import tiny_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0 if tied else 1)
    config = tiny_config(  # llama: 3 blocks x 32, 4 heads / 2 kv, MLP 64, 256 positions
        "llama",
        vocab_size=tok.get_vocab_size(),
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.save_pretrained(out)
    fast.save_pretrained(out)


def calibration_file() -> Path:
    from fedmobillm.paths import cache_dir

    path = cache_dir() / "test-models" / f"gen-calibration-{VERSION}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text("\n".join(CORPUS * 3) + "\n")
    return path


def gen_bundle(
    tied: bool = True,
    quant: str = "fp32",
    layers: list[int] | None = None,
    formats: tuple[str, ...] = ("onnx",),
) -> Path:
    """A bundle of ``tiny_llama(tied)`` with generation graphs (ONNX; ExecuTorch too with
    pte in ``formats``, a KV cache of PTE_CONTEXT positions; cached, rebuilt when it no
    longer verifies)."""
    from fedmobillm.export.pipeline import bundle_is_current, export_bundle
    from fedmobillm.paths import cache_dir

    folder = tiny_llama(tied)
    tag = f"{'tied' if tied else 'untied'}-{quant}-{'-'.join(map(str, layers or [])) or 'all'}"
    tag += "" if formats == ("onnx",) else "-" + "-".join(formats)
    out = cache_dir() / "test-bundles" / f"gen-{VERSION}-{tag}"
    if bundle_is_current(out, str(folder), "none"):
        return out
    shutil.rmtree(out, ignore_errors=True)
    export_bundle(
        str(folder),
        out,
        layers=layers,
        pivot="none",
        quant=quant,
        formats=formats,
        max_seq_len=64,
        calibration=str(calibration_file()),
        generate=True,
        generate_context=PTE_CONTEXT,
    )
    return out

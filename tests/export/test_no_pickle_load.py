"""Local model folders are read from safetensors only: a pickled checkpoint is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import LlamaForCausalLM

from fedmobillm.export.generate import load_causal_lm
from fedmobillm.export.wrapper import load_hf_model


@pytest.fixture
def tiny_folder(tmp_path):
    LlamaForCausalLM(tiny_config("llama", vocab_size=64)).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("load", [load_causal_lm, load_hf_model])
def test_safetensors_folder_loads(tiny_folder, load):
    assert load(tiny_folder) is not None


@pytest.mark.parametrize("load", [load_causal_lm, load_hf_model])
def test_pickled_checkpoint_is_refused(tiny_folder, load):
    state = LlamaForCausalLM.from_pretrained(tiny_folder).state_dict()
    (tiny_folder / "model.safetensors").unlink()
    torch.save(state, tiny_folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        load(tiny_folder)

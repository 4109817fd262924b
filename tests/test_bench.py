"""The benchmarks' own arithmetic: the Phi-2 they build is Phi-2's size, and MFU counts the right parameters."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_phi2 import PHI2, TINY, matmul_params  # noqa: E402

PHI2_PARAMETERS = 2_779_683_840  # microsoft/phi-2's safetensors hold this many (the "2.7B")


def test_the_benchmark_builds_phi2_at_its_exact_size():
    with torch.device("meta"):
        model = PhiForCausalLM(PhiConfig(**PHI2))
    assert sum(p.numel() for p in model.parameters()) == PHI2_PARAMETERS
    attention = model.model.layers[0].self_attn
    assert (attention.head_dim, attention.rotary_ndims) == (80, 32)  # Phi-2 rotates 32 of each head's 80 dims


@pytest.mark.parametrize("size", [PHI2, {**PHI2, **TINY}], ids=["phi2", "tiny"])
def test_mfu_counts_every_linear_layer_and_not_the_embedding(size):
    with torch.device("meta"):
        model = PhiForCausalLM(PhiConfig(**size))
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert matmul_params(model.config) == linear
    assert linear == sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel() - sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()
    )

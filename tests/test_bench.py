"""The benchmarks' own arithmetic: the Phi-2 they build is Phi-2's size, and MFU counts the right parameters."""

import json
import subprocess
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


ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, f"bench/{script}", *args, "--json", str(out)], cwd=ROOT, check=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_throughput_compares_the_two_batchings_on_the_same_tokens(tmp_path):
    result = run_bench(
        "train_throughput.py",
        *("--examples", "8", "--tokenizer", "tiny", "--hidden_size", "64", "--layers", "2", "--repeats", "2"),
        tmp_path=tmp_path,
    )
    original, ours = result["original"], result["ours"]
    assert (original["packing"], ours["packing"]) == (False, True)
    # The same conversations, so the same real tokens; ours processes no padding, the original pads to the longest.
    assert ours["real_tokens"] == original["real_tokens"] > 1000
    assert ours["processed_tokens"] == ours["real_tokens"] and ours["useful_token_share"] == 1.0
    assert original["processed_tokens"] > original["real_tokens"]
    assert ours["micro_batches"] <= original["micro_batches"]
    # Each variant ran twice and reports its fastest run; the ratio is computed from those.
    for variant in (original, ours):
        assert len(variant["train_seconds_every_run"]) == 2
        assert variant["train_seconds"] == min(variant["train_seconds_every_run"])
    expected = ours["real_tokens_per_second"] / original["real_tokens_per_second"]
    assert result["tokens_per_second_ratio"] == pytest.approx(expected, abs=0.006)


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_at_tiny_size_on_cpu(tmp_path):
    result = run_bench("gpu_phi2.py", "--tiny", "--steps", "2", "--warmup", "1", tmp_path=tmp_path)
    original, ours = result["original"], result["ours"]
    assert (original["packing"], ours["packing"]) == (False, True)
    assert ours["useful_token_share"] == 1.0 > original["useful_token_share"]
    for variant in (original, ours):
        assert variant["timed_steps"] == 2 and variant["real_tokens_timed"] > 0
        assert variant["matmul_params"] == matmul_params(PhiConfig(**{**PHI2, **TINY}))
        assert variant["mfu"] is None and variant["peak_memory_kind"] == "process peak RSS"  # no MFU without a GPU
    # A micro-batch of 4 packed rows holds more real tokens than 4 padded conversations.
    assert ours["real_tokens_timed"] > original["real_tokens_timed"]

"""Each private-API use in workarounds.py still reaches what it needs: these fail when upstream renames or moves it
(a renamed attribute would otherwise turn a workaround into a silent no-op)."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workarounds
from config import ModelArguments, QuantizationArguments
from model_utils import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_argument_parser_loads_without_transformers():
    code = (
        "import sys; from workarounds import hf_argument_parser_class; cls = hf_argument_parser_class(); "
        "print(cls.__module__, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["_hf_argparser", "False"], result.stderr


def test_cpu_bf16_query_exists():
    assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)
    assert isinstance(workarounds.cpu_has_bf16(), bool)


def test_4bit_layers_still_have_the_cpu_repack_flag(tiny_phi):
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments())
    flagged = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(flagged) == len([m for m in model.modules() if type(m).__name__ == "Linear4bit"]) > 0
    workarounds.keep_4bit_weights_trainable_on_cpu(model)
    assert not any(m.support_avx512bf16_for_cpu for m in flagged)


def test_the_cpu_repack_fails_on_inputs_not_a_multiple_of_the_block():
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layers = torch.nn.ModuleList()
    for inputs in (128, 160):
        layer = bnb.nn.Linear4bit(inputs, 96, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(96, inputs), requires_grad=False, quant_type="nf4")
        layers.append(layer.to("cpu"))  # quantizes
        layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    _convert_weight_packed_for_cpu(layers[0].weight.data, layers[0].weight.quant_state)  # 128 = 2 blocks of 64
    with pytest.raises(RuntimeError, match=r"shape '\[96, 2\]' is invalid for input of size 240"):
        _convert_weight_packed_for_cpu(layers[1].weight.data, layers[1].weight.quant_state)  # 160 = 2.5 blocks
    workarounds.skip_cpu_repack_where_it_fails(layers)
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [True, False]


def test_packing_mask_registry_knows_sdpa(tiny_phi):
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(load_in_4bit=False))
    assert workarounds.attention_implementation(model) == "sdpa"
    assert workarounds.attention_builds_packing_masks(model)
    model.config._attn_implementation = "no-such-kernel"
    assert not workarounds.attention_builds_packing_masks(model)


def test_the_trainer_still_loads_checkpoints_through_the_overridden_method():
    from trl import SFTTrainer

    parameters = list(inspect.signature(SFTTrainer._load_from_checkpoint).parameters)
    assert parameters == ["self", "resume_from_checkpoint", "model"]
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in inspect.getsource(SFTTrainer.train)

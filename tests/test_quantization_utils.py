"""quantization_utils.py: the precision decision (a pure function of the device), the 4-bit config, and the 4-bit
weights dequantized once for decoding on CPU, which decode and score what the 4-bit layers do."""

import json

import pytest
import torch

import scoring
from adapter_utils import load_chat_model
from config import GenerationArguments, QuantizationArguments
from generation_utils import DECODE_CHUNK_TOKENS, generate_replies
from quantization_utils import (
    FP16_WARNING,
    dequantize_decision,
    device_precision,
    for_training,
    linear_4bit_layers,
    merge_dtype,
    mixed_precision,
    training_compute_dtype,
)
from workarounds import keep_4bit_weights_trainable_on_cpu

GiB = 2**30


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "kind, capability, dtype",
    [
        ("cpu", None, torch.float32),
        ("cuda", (6, 1), torch.float16),  # Pascal (P40, GTX 10xx)
        ("cuda", (7, 0), torch.float16),  # V100
        ("cuda", (7, 5), torch.float16),  # T4: torch.cuda.is_bf16_supported() says True here (emulation)
        ("cuda", (8, 0), torch.bfloat16),  # A100
        ("cuda", (8, 6), torch.bfloat16),  # A10, RTX 30xx
        ("cuda", (8, 9), torch.bfloat16),  # L4, RTX 40xx
        ("cuda", (9, 0), torch.bfloat16),  # H100
        ("cuda", (12, 0), torch.bfloat16),  # RTX 50xx: a two-digit major version compares as a number
    ],
)
def test_precision_is_decided_by_compute_capability(kind, capability, dtype):
    decided, warning = device_precision(kind, capability)
    assert decided == dtype
    if dtype == torch.float16:
        major, minor = capability
        assert warning == (
            f"This GPU (compute capability {major}.{minor}) has no native bf16: computing in float16, which can "
            "overflow in Phi-2's attention. A run stops at the first nan or inf loss and says what to do."
        )
        assert warning == FP16_WARNING.format(major=major, minor=minor)
    else:
        assert warning is None


@pytest.mark.parametrize(
    "native, asked, flags",
    [
        (torch.bfloat16, (None, None), (True, False)),  # A100 and newer: bf16
        (torch.float16, (None, None), (False, True)),  # T4, V100: fp16
        (torch.float16, (None, False), (False, False)),  # T4 with --fp16 false: float32
        (torch.bfloat16, (False, None), (False, False)),  # --bf16 false: float32
        (torch.bfloat16, (None, True), (False, True)),  # --fp16 true on an A100: fp16, as asked
        (torch.float16, (True, None), (True, False)),  # --bf16 true on a T4: emulated, as asked (with a warning)
        (torch.float16, (False, None), (False, True)),  # --bf16 false on a T4: its default, fp16
    ],
)
def test_mixed_precision_flags_follow_the_device_unless_asked(native, asked, flags):
    assert mixed_precision(native, *asked) == flags


@pytest.mark.parametrize(
    "kind, capability, asked, dtype",
    [
        ("cuda", (9, 0), (None, None), torch.bfloat16),  # H100: its native dtype
        ("cuda", (9, 0), (None, True), torch.float16),  # --fp16 true on an H100: the matmuls in fp16 too
        ("cuda", (8, 0), (False, None), torch.float32),  # --bf16 false: float32 throughout
        ("cuda", (9, 0), (False, False), torch.float32),
        ("cuda", (7, 5), (None, None), torch.float16),  # T4
        ("cuda", (7, 5), (True, None), torch.bfloat16),  # --bf16 true on a T4: as asked (emulated, with a warning)
        ("cuda", (7, 5), (None, False), torch.float32),  # --fp16 false on a T4
        ("cpu", None, (None, None), torch.float32),
        ("cpu", None, (True, None), torch.float32),  # a bf16 CPU autocasts; its weights stay float32
        ("cpu", None, (None, True), torch.float32),  # no fp16 training on CPU
    ],
)
def test_a_training_runs_auto_compute_dtype_follows_its_mixed_precision(kind, capability, asked, dtype):
    assert training_compute_dtype(kind, capability, *asked) == dtype


def test_explicit_compute_dtypes_are_kept_for_training():
    for name in ("bfloat16", "float16", "float32"):
        explicit = QuantizationArguments(bnb_4bit_compute_dtype=name)
        assert for_training(explicit, None, True) is explicit
    auto = QuantizationArguments()
    assert for_training(auto, None, None).bnb_4bit_compute_dtype == "float32"  # this machine has no CUDA
    assert auto.bnb_4bit_compute_dtype == "auto"  # what run_config.yaml records


@pytest.mark.parametrize(
    "kind, capability, dtype",
    [
        ("cpu", None, torch.bfloat16),  # a portable 16-bit artifact with float32's range
        ("cuda", (7, 0), torch.float16),  # V100
        ("cuda", (7, 5), torch.float16),  # T4: a bf16 model would run emulated there
        ("cuda", (8, 0), torch.bfloat16),
        ("cuda", (9, 0), torch.bfloat16),
    ],
)
def test_merge_dtype_auto_is_the_devices_compute_dtype(kind, capability, dtype):
    assert merge_dtype(kind, capability) == dtype


@pytest.mark.slow
def test_dequantized_weights_decode_and_score_what_the_4bit_layers_do(tiny_cpu_run):
    _, out, _ = tiny_cpu_run
    four_bit, tokenizer = load_chat_model(out, quant_args=QuantizationArguments(dequantize_on_cpu="no"))
    keep_4bit_weights_trainable_on_cpu(four_bit)  # bitsandbytes' own matmul, which dequantizes at every forward
    dequantized, _ = load_chat_model(out, quant_args=QuantizationArguments(dequantize_on_cpu="yes"))
    assert list(linear_4bit_layers(four_bit)) and not list(linear_4bit_layers(dequantized))
    prompts = [conversation(q) for q in json.loads((out / "eval.json").read_text())["prompts"]]
    ids = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    greedy = GenerationArguments(max_new_tokens=2 * DECODE_CHUNK_TOKENS, temperature=0)
    for side in ("__base__", "default"):  # the adapter still switches off and on
        with scoring.running(four_bit, side), scoring.running(dequantized, side), torch.inference_mode():
            assert torch.equal(four_bit(ids).logits, dequantized(ids).logits)
            replies = generate_replies(four_bit, tokenizer, prompts, greedy)
            assert generate_replies(dequantized, tokenizer, prompts, greedy) == replies
    tuned = [r["reply"] for r in replies]
    with scoring.running(dequantized, "__base__"):
        assert [r["reply"] for r in generate_replies(dequantized, tokenizer, prompts, greedy)] != tuned


@pytest.mark.parametrize(
    ("setting", "added", "available", "fused_kernel", "expected"),
    [
        ("auto", 1 * GiB, 24 * GiB, False, True),
        ("auto", 11 * GiB, 16 * GiB, False, False),  # Phi-2 in float32 on a 16 GB laptop: stays 4-bit
        ("auto", 1 * GiB, 24 * GiB, True, False),  # bitsandbytes' fused bf16 CPU kernel is faster at one row
        ("yes", 11 * GiB, 16 * GiB, True, True),
        ("no", 1 * GiB, 24 * GiB, False, False),
    ],
)
def test_when_the_weights_are_dequantized(setting, added, available, fused_kernel, expected):
    assert dequantize_decision(setting, added, available, fused_kernel) is expected

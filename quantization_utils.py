"""4-bit nf4 quantization of the frozen base (the "Q" in QLoRA), and the one place that decides precision.

`compute_dtype` (what the matmuls run in) and `training_precision` (the Trainer's bf16/fp16 flags, and the optimizer
fallback on CPU) both follow from the same facts about the device, decided here and nowhere else.
"""

import functools
import logging
import os

import torch
from transformers import BitsAndBytesConfig

from config import QuantizationArguments
from workarounds import cpu_has_bf16

logger = logging.getLogger(__name__)

# Optimizers that bitsandbytes runs on CUDA only (paged memory, 8-bit states).
CUDA_ONLY_OPTIMIZERS = ("paged", "bnb", "8bit")


@functools.cache
def gpu_has_bf16() -> bool:
    """Whether the GPU computes in bf16; says once, when it does not, that fp16 takes its place."""
    if torch.cuda.is_bf16_supported():
        return True
    logger.warning(
        "This GPU has no bf16 (e.g. a T4): computing in float16, which can overflow in Phi-2's attention; watch for a "
        "nan loss."
    )
    return False


def compute_dtype(args: QuantizationArguments) -> torch.dtype:
    """The dtype the dequantized matmuls (and the unquantized layers) run in, chosen for the device when 'auto'."""
    if args.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, args.bnb_4bit_compute_dtype)
    if not torch.cuda.is_available():
        return torch.float32  # bf16 matmuls are slow or emulated on most CPUs; float32 is exact and fast enough
    return torch.bfloat16 if gpu_has_bf16() else torch.float16  # bf16 has fp32's range: Phi-2 overflows in fp16


def training_precision(bf16: bool | None, fp16: bool, optim: str) -> tuple[bool, bool, str]:
    """The Trainer's (bf16, fp16, optim) on this device, from what the user asked (bf16 None: decide)."""
    if torch.cuda.is_available():
        if bf16 is None and not fp16:
            bf16 = gpu_has_bf16()
            fp16 = not bf16
        return bool(bf16), fp16, optim
    # CPU: float32 by default; bf16 only when asked for and the CPU has bf16 instructions, where it is faster.
    cpu_bf16 = bool(bf16) and cpu_has_bf16()
    if (bf16 and not cpu_bf16) or fp16:
        logger.warning("No CUDA GPU: mixed precision is off, training in float32 on CPU.")
    if any(name in optim for name in CUDA_ONLY_OPTIMIZERS):
        logger.warning("--optim %s needs CUDA: using adamw_torch on CPU.", optim)
        optim = "adamw_torch"
    return cpu_bf16, False, optim


def fsdp_enabled() -> bool:
    """Launched with FSDP: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def quant_storage_dtype(args: QuantizationArguments) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in. FSDP flattens each wrapped layer's parameters into one
    tensor of a single float dtype, so under FSDP the 4-bit weights must be stored in the dtype of the rest."""
    if args.bnb_4bit_quant_storage != "auto":
        return getattr(torch, args.bnb_4bit_quant_storage)
    return compute_dtype(args) if fsdp_enabled() else torch.uint8


def build_bnb_config(args: QuantizationArguments) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for a 4-bit base, or None when 4-bit loading is off."""
    if not args.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(args),
        bnb_4bit_quant_storage=quant_storage_dtype(args),
    )

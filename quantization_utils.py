"""4-bit nf4 quantization of the frozen base model (the "Q" in QLoRA), from `QuantizationArguments`."""

import logging
import os

import torch
from transformers import BitsAndBytesConfig

from config import QuantizationArguments

logger = logging.getLogger(__name__)


def compute_dtype(args: QuantizationArguments) -> torch.dtype:
    """The dtype the dequantized matmuls (and the unquantized layers) run in, chosen for the device when 'auto'."""
    if args.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, args.bnb_4bit_compute_dtype)
    if not torch.cuda.is_available():
        return torch.float32  # CPU: bf16 matmuls are slow or emulated on most CPUs; float32 is exact and fast enough
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16  # Phi-2 overflows in fp16 attention; bf16 has fp32's range
    logger.warning("This GPU has no bf16 (e.g. a T4): computing in float16, which can overflow in Phi-2's attention.")
    return torch.float16


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

"""4-bit nf4 quantization of the frozen base (the "Q" in QLoRA), and the one place that decides precision.

The decision is a pure function of the device (`device_precision(kind, capability)`): bf16 on GPUs that compute in it
natively (compute capability 8.0 and up: A100, L4, RTX 30xx and newer), fp16 on older GPUs (T4, V100), float32 on
CPU. `compute_dtype` (what the matmuls run in), `training_precision` (the Trainer's bf16/fp16 flags, and the optimizer
fallbacks), `training_compute_dtype` (a training run's 'auto': its mixed precision, when --bf16/--fp16 say) and
`merge_dtype` (--merge-dtype auto) all follow from it, here and nowhere else. What stays in float32 whatever the
compute dtype (the norms, the trained LoRA weights outside bf16) and what is dequantized for CPU decoding is set here
too.
"""

import copy
import dataclasses
import functools
import logging
import os

import torch
from transformers import BitsAndBytesConfig

from config import QuantizationArguments
from workarounds import cpu_has_bf16

logger = logging.getLogger(__name__)

# Optimizers from bitsandbytes: CUDA only (paged memory, 8-bit states), and their paged states are CPU tensors over
# CUDA managed memory (torch.frombuffer), which FSDP's optimizer-state gathering does not handle.
BNB_OPTIMIZERS = ("paged", "bnb", "8bit")
# The first compute capability with bf16 tensor cores (Ampere). Older GPUs run bf16 only emulated, which is why
# torch.cuda.is_bf16_supported() (it counts emulation) answers yes on a T4 and is not asked here.
NATIVE_BF16_CAPABILITY = (8, 0)
FP16_WARNING = (
    "This GPU (compute capability {major}.{minor}) has no native bf16: computing in float16, which can overflow in "
    "Phi-2's attention. A run stops at the first nan or inf loss and says what to do."
)


def device_precision(kind: str, capability: tuple[int, int] | None = None) -> tuple[torch.dtype, str | None]:
    """The dtype to compute in on a device of this kind ("cuda", "cpu") and compute capability, and the warning that
    comes with it when it is a compromise (None when it is not)."""
    if kind != "cuda":
        return torch.float32, None  # bf16 matmuls are slow or emulated on most CPUs; float32 is exact and fast enough
    if tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return torch.bfloat16, None  # bf16 has fp32's range: Phi-2 overflows in fp16
    major, minor = capability
    return torch.float16, FP16_WARNING.format(major=major, minor=minor)


def mixed_precision(native: torch.dtype, bf16: bool | None, fp16: bool | None) -> tuple[bool, bool]:
    """The Trainer's (bf16, fp16) on a GPU whose native dtype is `native`, from what the user asked (None: decide).
    Asking for one turns the other's default off; asking for neither (--bf16 false --fp16 false) trains in float32."""
    if bf16 is None:
        bf16 = native == torch.bfloat16 and not fp16
    if fp16 is None:
        fp16 = native == torch.float16 and not bf16
    return bool(bf16), bool(fp16)


def training_compute_dtype(
    kind: str, capability: tuple[int, int] | None, bf16: bool | None, fp16: bool | None
) -> torch.dtype:
    """--bnb_4bit_compute_dtype auto in a training run: on a GPU, the dtype of the mixed precision it trains in (as
    `mixed_precision` decides from --bf16/--fp16; None: not given), so that --fp16 true on an A100 computes in
    float16 and --bf16 false --fp16 false in float32; on CPU, float32 whatever the flags (a bf16 CPU run autocasts
    its matmuls, and float32 weights keep everything else exact)."""
    native, _ = device_precision(kind, capability)
    if kind != "cuda":
        return native
    bf16, fp16 = mixed_precision(native, bf16, fp16)
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def merge_dtype(kind: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """--merge-dtype auto: on a GPU, the dtype it computes in (bf16 from compute capability 8.0, fp16 below: a T4
    would run a bf16 model emulated); on CPU, bfloat16: half of float32's size, float32's range (Phi-2 overflows in
    fp16 attention), and native on the GPUs that serve most."""
    if kind != "cuda":
        return torch.bfloat16
    return device_precision(kind, capability)[0]


def this_device() -> tuple[str, tuple[int, int] | None]:
    """This process's device: ("cuda", its compute capability) or ("cpu", None), for the decisions above."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_capability(torch.cuda.current_device())
    return "cpu", None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling of the dtype flags."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def this_device_precision() -> torch.dtype:
    """`device_precision` for this process's device; its warning is logged once."""
    dtype, warning = device_precision(*this_device())
    if warning:
        logger.warning(warning)
    return dtype


def compute_dtype(args: QuantizationArguments) -> torch.dtype:
    """The dtype the dequantized matmuls (and the unquantized layers) run in, chosen for the device when 'auto'."""
    if args.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, args.bnb_4bit_compute_dtype)
    return this_device_precision()


def for_training(args: QuantizationArguments, bf16: bool | None, fp16: bool | None) -> QuantizationArguments:
    """The settings a training run loads its base with: a compute dtype of 'auto' becomes `training_compute_dtype` on
    this device (run_config.yaml keeps 'auto', so that the report and inference choose for their own device)."""
    if args.bnb_4bit_compute_dtype != "auto":
        return args
    dtype = training_compute_dtype(*this_device(), bf16, fp16)
    return dataclasses.replace(args, bnb_4bit_compute_dtype=dtype_name(dtype))


def training_precision(bf16: bool | None, fp16: bool | None, optim: str) -> tuple[bool, bool, str]:
    """The Trainer's (bf16, fp16, optim) on this device and launch, from what the user asked (None: decide)."""
    if fsdp_enabled() and any(name in optim for name in BNB_OPTIMIZERS):
        # PEFT's FSDP guide: paged 8-bit AdamW fails when FSDP-QLoRA saves a checkpoint; the paged 32-bit one keeps
        # its states in the same managed-memory tensors.
        logger.warning("--optim %s does not work under FSDP: using adamw_torch.", optim)
        optim = "adamw_torch"
    if torch.cuda.is_available():
        native = this_device_precision()
        if bf16 and native != torch.bfloat16:
            logger.warning("--bf16 true on a GPU without native bf16: it is emulated, and slow.")
        return (*mixed_precision(native, bf16, fp16), optim)
    # CPU: float32 by default; bf16 only when asked for and the CPU has bf16 instructions, where it is faster.
    cpu_bf16 = bool(bf16) and cpu_has_bf16()
    if (bf16 and not cpu_bf16) or fp16:
        logger.warning("No CUDA GPU: mixed precision is off, training in float32 on CPU.")
    if any(name in optim for name in BNB_OPTIMIZERS):
        logger.warning("--optim %s needs CUDA: using adamw_torch on CPU.", optim)
        optim = "adamw_torch"
    return cpu_bf16, False, optim


def keep_norms_in_float32(model) -> None:
    """Store the normalization layers' weights in float32, as peft's `prepare_model_for_kbit_training` does, and
    nothing else: peft upcasts every parameter that is not 4-bit, which for Phi-2 includes the frozen, untied
    embedding and output head (twice their memory, for nothing), and which TRL's ORPOTrainer still applies itself.
    Everything is frozen here; get_peft_model then makes the LoRA weights the only trainable ones, and the Trainer
    turns activation checkpointing on."""
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    for param in model.parameters():
        param.requires_grad = False


def keep_trainable_weights_in_float32(model) -> None:
    """Train float32 LoRA weights unless training in bf16.

    TRL 1.16's SFTTrainer casts the LoRA weights of a 4-bit model to bf16 whatever the precision (right for bf16, as
    the QLoRA paper trains). With --fp16 the first optimizer step would then fail in the GradScaler, which unscales
    float32 gradients only ("not implemented for 'BFloat16'", https://github.com/huggingface/trl/issues/4901). In
    float32 (CPU) every LoRA matmul would run in bf16, which a CPU without bf16 instructions emulates, slower than
    float32, and the updates would be rounded to bf16. The optimizer does not exist yet, so casting back here is the
    whole fix, and --resume keeps these dtypes (workarounds.RestoreTrainableDtypesOnResume)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


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


def dequantize_on_cpu(model, setting: str = "auto") -> int:
    """Generation on CPU: replace each 4-bit linear layer by a plain one that holds its weight dequantized once, in the
    layer's compute dtype; returns the bytes this adds (0 when the layers stay 4-bit).

    Where bitsandbytes has no fused 4-bit kernel for the CPU, it dequantizes every 4-bit weight at every forward: a
    small cost in a training step, most of a decoding step, which runs the model for one token. The plain layer
    computes what that matmul computes (the same weights, dequantized the same way, in the same dtype), so replies
    and losses do not change; LoRA layers keep the plain layer as their base, so adapters still switch on and off.
    GPUs keep bitsandbytes' fused kernels. `setting`: "yes", "no" or "auto" (`dequantize_decision`)."""
    layers = list(linear_4bit_layers(model))
    if not layers or any(layer.weight.device.type != "cpu" for _, _, layer in layers):
        return 0
    added = sum(layer.weight.quant_state.shape.numel() * layer_dtype(layer).itemsize for _, _, layer in layers)
    added -= sum(layer.weight.numel() * layer.weight.element_size() for _, _, layer in layers)
    # bitsandbytes' bf16 kernel for CPUs with AVX512-BF16 reads the 4-bit weights without dequantizing them first.
    fused = all(getattr(layer, "support_avx512bf16_for_cpu", False) for _, _, layer in layers)
    if not dequantize_decision(setting, added, available_memory(), fused):
        return 0
    for parent, name, layer in layers:
        setattr(parent, name, dequantized_linear(layer))
    return added


def dequantize_decision(setting: str, added: int, available: int, fused_kernel: bool) -> bool:
    """Whether to dequantize: "yes", "no", or "auto": where bitsandbytes has no fused CPU kernel (with one, a reply
    of one row runs faster from the 4-bit weights than from float32 ones), when the dequantized weights add at most
    half the free memory (Phi-2 adds 9 GB in float32)."""
    if setting != "auto":
        return setting == "yes"
    return not fused_kernel and added <= available // 2


def linear_4bit_layers(model):
    """(parent module, attribute name, layer) of every bitsandbytes 4-bit linear layer, LoRA's base layers included."""
    # bitsandbytes is imported where a 4-bit model is there to handle: its import logs a known line
    # (cli_utils.QUIET_LOG_MESSAGES) that an entry point can filter only once it has set up logging.
    from bitsandbytes.nn import Linear4bit

    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Linear4bit):
                yield parent, name, child


def layer_dtype(layer) -> torch.dtype:
    """The dtype a 4-bit layer computes in: its compute dtype (from the quantization config), else its input's,
    which is the model's dtype."""
    return layer.compute_dtype or layer.weight.quant_state.dtype


def dequantized_linear(layer) -> torch.nn.Linear:
    """A plain linear layer with the 4-bit layer's weight dequantized (as bitsandbytes' own matmul dequantizes it)."""
    from bitsandbytes.functional import dequantize_4bit  # as in linear_4bit_layers

    dtype = layer_dtype(layer)
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    state = copy.copy(layer.weight.quant_state)
    state.dtype = dtype  # dequantized straight into the compute dtype, as bitsandbytes' matmul does
    weight = dequantize_4bit(layer.weight.data, state)
    plain.weight = torch.nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return plain.train(layer.training)


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux's MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

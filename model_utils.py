"""Load the tokenizer (with the conversation template) and the base model (4-bit nf4 by default), from the Hub or a
local folder, and say which device they run on; save the tokenizer with the portable template. Used by training,
inference, the page and the report alike.
"""

import functools
import json
import logging
import os
import platform
from pathlib import Path

import torch
from accelerate import PartialState
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import get_session
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chat_template import CHAT_TEMPLATE, PORTABLE_CHAT_TEMPLATE
from config import ModelArguments, QuantizationArguments, UserError
from quantization_utils import build_bnb_config, compute_dtype, fsdp_enabled, quant_storage_dtype, this_device
from workarounds import skip_cpu_repack_where_it_fails

logger = logging.getLogger(__name__)

# flash-attn 2 runs on Ampere and newer GPUs only (compute capability 8.0: A100, A10, L4, RTX 30xx and up).
FLASH_ATTENTION_CAPABILITY = (8, 0)


class ModelError(UserError):
    """A model, adapter or checkpoint that cannot be used; the message says what to do."""


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with our conversation template installed as its chat_template."""
    check_model_source(name_or_path, "tokenizer_config.json")
    # Outside the try below: the ModelError it may raise is already the one line to show.
    local_files_only = hub_unreachable(name_or_path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except OSError as e:
        raise ModelError(unreachable_model_message(name_or_path, e)) from None
    except (
        Exception
    ) as e:  # a damaged tokenizer file: KeyError, TypeError, JSONDecodeError or tokenizers' own Exception
        raise ModelError(
            f"cannot read the tokenizer of {name_or_path} ({type(e).__name__}: {first_line(e)}): its tokenizer files "
            "are damaged; copy them again from the base model."
        ) from None
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer of {name_or_path} has no EOS token; the template needs one to end replies.")
    if tokenizer.pad_token is None:
        # Phi-2 has no pad token. Reusing EOS is safe here: TRL's collator builds labels from each example's own
        # length, not by comparing ids with the pad id, so the EOS that ends a reply is still trained.
        tokenizer.pad_token = tokenizer.eos_token
    # Always the training template, whatever the folder saved: its {% generation %} markers give the loss masks.
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder) -> None:
    """Save the tokenizer with the portable template, which renders the same text without transformers' Jinja
    extension, so that engines that render templates themselves (llama.cpp, TGI) accept it; the tokenizer in memory
    keeps the training one."""
    training_template, tokenizer.chat_template = tokenizer.chat_template, PORTABLE_CHAT_TEMPLATE
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = training_template


def load_model(
    model_args: ModelArguments, quant_args: QuantizationArguments, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The base model: 4-bit nf4 when quantization is on, in the compute dtype otherwise; sdpa attention."""
    if trust_remote_code:
        logger.warning(
            "--trust_remote_code runs Python code shipped with the model. Use it only for sources you trust."
        )
    if quant_args.load_in_4bit and fsdp_enabled() and not quant_storage_dtype(quant_args).is_floating_point:
        raise ModelError(
            "FSDP shards only float tensors: use --bnb_4bit_quant_storage auto (the compute dtype) with FSDP."
        )
    attn, warning = device_attention(model_args.attn_implementation, *this_device())
    if warning:
        logger.warning(warning)
    name = model_args.model_name_or_path
    check_model_source(name)
    folder = Path(name).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelError(
            f"{folder} holds only pickled weights (*.bin), which are never loaded (unpickling can run code): convert "
            "them to safetensors once, where you trust them (from_pretrained, then save_pretrained)."
        )
    if folder.is_dir():
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors(weights, "copy the model folder again")
    # Outside the try below: the ModelError it may raise is already the one line to show.
    local_files_only = hub_unreachable(name, model_args.model_revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=model_args.model_revision,
            quantization_config=build_bnb_config(quant_args),
            dtype=compute_dtype(quant_args),
            attn_implementation=attn,
            device_map=device_map(),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # pickled .bin weights can run code when loaded
            local_files_only=local_files_only,
        )
    except OSError as e:
        raise ModelError(unreachable_model_message(name, e)) from None
    except ImportError as e:  # flash-attn not installed, a kernel package missing
        raise ModelError(f"{str(e).splitlines()[0]} (or use --attn_implementation sdpa)") from None
    except ValueError as e:  # a config.json naming an architecture transformers does not know, or without model_type
        raise ModelError(f"cannot load a model from {name}: {first_line(e)}") from None
    if quant_args.load_in_4bit:
        skip_cpu_repack_where_it_fails(model)
    return model


def device_attention(requested: str, kind: str, capability: tuple[int, int] | None = None) -> tuple[str, str | None]:
    """The attention kernel to load with on a device of this kind and compute capability, and the warning when it is
    not the one asked for: flash-attention 2 falls back to sdpa on CPU and below compute capability 8.0 (a T4, a V100),
    where it would fail at the first forward pass."""
    if requested != "flash_attention_2":
        return requested, None
    if kind != "cuda":
        return "sdpa", "--attn_implementation flash_attention_2 needs a CUDA GPU: using sdpa on CPU."
    if tuple(capability) < FLASH_ATTENTION_CAPABILITY:
        major, minor = capability
        return "sdpa", (
            f"--attn_implementation flash_attention_2 needs compute capability 8.0 or newer (this GPU has "
            f"{major}.{minor}): using sdpa."
        )
    return requested, None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def check_safetensors(path: Path, remedy: str) -> None:
    """A safetensors file whose header reads and whose data has every byte the header announces (safetensors checks
    both when it opens the file, without reading the tensors): a download or copy cut short fails here, at once."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is damaged ({first_line(e)}): {remedy}.") from None


def looks_like_path(name_or_path: str) -> bool:
    """A local path rather than a Hub id ("org/name"): it exists, starts like a path, has more than one "/", or its
    parent folder is here (cache/tiny-phi before tiny_model.py made it)."""
    path = Path(name_or_path).expanduser()
    return (
        path.exists()
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or (name_or_path.count("/") == 1 and path.parent.is_dir())
    )


def check_model_source(name_or_path: str, required_file: str = "config.json") -> None:
    """A local model or tokenizer must be a folder saved with save_pretrained, whose config files are JSON objects;
    anything else is taken for a Hub id."""
    path = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not path.exists():
        raise ModelError(f"no model folder at {name_or_path}: pass a folder saved with save_pretrained, or a Hub id.")
    if path.exists() and not (path / required_file).is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelError(
                f"{name_or_path} holds a LoRA adapter, not a model: pass it as --adapter (inference.py, app.py) and "
                "its base model as --model or --base."
            )
        raise ModelError(f"{name_or_path} is not a model folder (it has no {required_file}).")
    for name in dict.fromkeys((required_file, "config.json")):
        if path.is_dir() and (path / name).is_file():
            try:
                settings = json.loads((path / name).read_text(encoding="utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelError(
                    f"{path / name} is not valid JSON ({e}): the folder is damaged; copy it again."
                ) from None
            if not isinstance(settings, dict):
                raise ModelError(f"{path / name} is not a JSON object: the folder is damaged; copy it again.")


@functools.cache
def hub_unreachable(name_or_path: str, revision: str | None = None) -> bool:
    """For a Hub id: whether to load from the local cache only, because the Hub does not answer. Without a network
    huggingface_hub retries each file for about 45 s before it fails; one probe settles it at once. An id that is not
    in the cache then fails with the one-line 'cannot download' error."""
    if looks_like_path(name_or_path) or constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
        return False
    except Exception:  # httpx's connection, DNS, proxy and timeout errors: all mean "no Hub"
        if try_to_load_from_cache(name_or_path, "config.json", revision=revision) is None:
            raise ModelError(unreachable_model_message(name_or_path, None)) from None
        logger.warning("The Hugging Face Hub does not answer: using the cached copy of %s.", name_or_path)
        return True


def unreachable_model_message(name_or_path: str, error: Exception | None) -> str:
    if looks_like_path(name_or_path) and error is not None:
        return (
            f"cannot load a model from {name_or_path}: {first_line(error)} (it must be a whole folder saved with "
            "save_pretrained)"
        )
    return (
        f"cannot download {name_or_path} from the Hugging Face Hub (no network?). Download it where there is one "
        f"(huggingface-cli download {name_or_path} --local-dir DIR), or use a copy you have, and pass its folder: "
        f"--model DIR (train.py) or --base DIR (inference.py)."
    )


def is_main_process() -> bool:
    """True in a plain `python` run, and in the process of global rank 0 under torchrun or accelerate launch (both
    set RANK): the one that writes files and logs; the Trainer's own `is_world_process_zero()` agrees."""
    return int(os.environ.get("RANK", 0)) == 0


def device_map() -> dict[str, int | str]:
    """bitsandbytes needs the whole model on one device: the GPU accelerate gives this process. Under torchrun or
    accelerate launch that is the local rank modulo the GPUs the process sees, so a launch that shows each process
    only its own GPU (SLURM --gpus-per-task=1: LOCAL_RANK 3, one GPU, cuda:0) works as well as one that shows all."""
    if torch.cuda.is_available():
        device = PartialState().device  # the Trainer's accelerator uses this same (shared) state
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": "cpu"}


def context_length(model) -> int:
    """How many tokens (prompt and reply) the model can attend to."""
    return model.config.max_position_embeddings


def describe_hardware(processes: int = 1) -> str:
    """The device this process runs on; with several processes (torchrun, accelerate), how many."""
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        gpu = f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB)"
        return gpu if processes == 1 else f"{processes} x {gpu}"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return cpu if processes == 1 else f"{processes} processes on {cpu}"

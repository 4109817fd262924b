"""LoRA adapters: the config from `LoraArguments`; finding, checking and loading a trained adapter on its base (for
generation, or trainable for DPO with its frozen reference copy); merging it into a standalone model.
"""

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import GenerationConfig
from transformers.pytorch_utils import Conv1D

from checkpoint_utils import ADAPTER_CONFIG, ADAPTER_FILE, latest_checkpoint
from config import (
    GENERATION_CONFIG,
    PHI_LORA_TARGETS,
    ConfigError,
    LoraArguments,
    ModelArguments,
    QuantizationArguments,
)
from model_utils import ModelError, check_safetensors, first_line, load_model, load_tokenizer, save_tokenizer
from quantization_utils import dequantize_on_cpu

logger = logging.getLogger(__name__)

# peft is imported in the functions that use it: importing peft imports bitsandbytes, which logs a known line at
# import (cli_utils.QUIET_LOG_MESSAGES) that an entry point can filter only once it has set up logging.


def lora_target_modules(spec: str, model_type: str) -> list[str] | str:
    """'auto': Phi's attention and MLP projections on Phi models; on other architectures every linear layer but
    the output head (peft's 'all-linear'), so --model can name any causal LM. Else a comma list or 'all-linear'."""
    if spec == "auto":
        spec = PHI_LORA_TARGETS if model_type == "phi" else "all-linear"
    if spec == "all-linear":
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def build_lora_config(args: LoraArguments, model_type: str):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(args.lora_target_modules, model_type),
        bias="none",  # biases stay frozen: the adapter alone is saved and swapped, as in the QLoRA paper
        task_type="CAUSAL_LM",
    )


def find_adapter(path: str | Path) -> Path:
    """The final adapter in `path`, else its latest checkpoint (one with an adapter file is enough here)."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"no adapter at {folder}: train one with `python train.py`, or pass --adapter DIR.")
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file: --adapter takes the folder that holds adapter_config.json.")
    if (folder / ADAPTER_CONFIG).is_file():
        check_adapter_files(folder)
        return folder
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        logger.info("No final adapter in %s: using %s.", folder, checkpoint)
        check_adapter_files(checkpoint)
        return checkpoint
    raise ModelError(
        f"{folder} is not a LoRA adapter: it holds no adapter_config.json and no complete checkpoint-N folder."
    )


def check_adapter_files(folder: Path) -> None:
    """Safetensors only: a pickled adapter_model.bin can run code when loaded, so it is refused, not loaded."""
    if not (folder / ADAPTER_FILE).is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ModelError(
                f"{folder} holds a pickled adapter_model.bin, which is never loaded (unpickling can run code); "
                f"save the adapter with safetensors ({ADAPTER_FILE})."
            )
        raise ModelError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_FILE}: the adapter is incomplete.")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / ADAPTER_CONFIG} is not valid JSON ({e}).") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ModelError(f"{folder / ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type).")
    check_safetensors(folder / ADAPTER_FILE, "copy the adapter again, or use another checkpoint")


def same_model(a: str, b: str) -> bool:
    """Two names of one base model: equal, or the same local folder."""
    if a == b:
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    return path_a.exists() and path_b.exists() and path_a.resolve() == path_b.resolve()


def load_chat_model(
    adapter: str | Path | None,
    base: str | None = None,
    quant_args: QuantizationArguments | None = None,
    attn_implementation: str = "sdpa",
    float32_adapter: bool = False,
):
    """Base model (+ LoRA adapter unless `adapter` is None) and the tokenizer, ready for generation. The LoRA weights
    run in the base's compute dtype, or in float32 with `float32_adapter` (peft's default, which merging wants)."""
    from peft import PeftConfig

    quant_args = quant_args or QuantizationArguments()
    adapter_dir = find_adapter(adapter) if adapter is not None else None
    if adapter_dir is not None:
        try:
            trained_on = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
        except (KeyError, TypeError, ValueError) as e:  # an unknown peft_type, fields peft does not take
            raise ModelError(
                f"peft cannot read {adapter_dir / ADAPTER_CONFIG} ({type(e).__name__}: {first_line(e)}): it is "
                "damaged or not from peft; use another checkpoint, or train again."
            ) from None
        if base is not None and trained_on and not same_model(trained_on, base):
            raise ModelError(
                f"the adapter in {adapter_dir} was trained on {trained_on}, not {base}: leave --base out to use "
                f"{trained_on} (if {base} is a copy of it, set base_model_name_or_path in {ADAPTER_CONFIG})."
            )
        base = base or trained_on
    if base is None:
        raise ModelError("no base model: pass --base MODEL.")
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base)
    model = load_model(ModelArguments(model_name_or_path=base, attn_implementation=attn_implementation), quant_args)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, base, float32_adapter)
    model.eval()
    added = dequantize_on_cpu(model, quant_args.dequantize_on_cpu)
    if added:
        logger.info("Dequantized the 4-bit weights once for generating on CPU (%.2f GiB more).", added / 2**30)
    return model, tokenizer


def load_adapter(model, adapter_dir: Path, base: str, float32_adapter: bool = False, trainable: bool = False):
    """PeftModel on `model`; an adapter that does not fit the base, or whose settings peft refuses, in one line.
    peft's default upcasts bf16/fp16 LoRA weights to float32 (twice their memory, and the LoRA matmuls in float32),
    which generation gains nothing from; merging asks for it (`float32_adapter`) to fold exactly, and so does training
    on (`trainable`: train.py --init_adapter)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(
            model, adapter_dir, autocast_adapter_dtype=float32_adapter, is_trainable=trainable
        )
    except (KeyError, TypeError, ValueError, SafetensorError) as e:  # peft's NoMatchingPeftModuleError: a ValueError
        raise ModelError(
            f"cannot load the adapter in {adapter_dir} on {base} ({type(e).__name__}: {first_line(e)}): its "
            f"{ADAPTER_CONFIG} is damaged or it was made for another model; use another checkpoint, or train again."
        ) from None
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):  # not torch's shape check: not the user's input
            raise
        raise ModelError(
            f"the adapter in {adapter_dir} does not fit {base}: its weights have other shapes (it was trained on "
            "another model); leave --base out to use the model it was trained on."
        ) from None


def load_trainable_adapter(model, adapter: str):
    """--init_adapter on the prepared base, trainable. DPOTrainer, given a PEFT model and no reference model, keeps a
    frozen copy of this adapter under the name "ref" and computes the reference log-probs through it: the reference
    is the SFT policy, on the same base in memory (no second copy of the base), for a LoRA-sized copy of weights.
    We chose it over TRL's precomputed reference log-probs (precompute_ref_log_probs), which also needs no second base
    but scores the whole training set before the first step and caches it in a datasets cache file keyed by hashes of
    the data and the model; the reference adapter costs one no-grad forward per step instead, works the same for the
    dev set, --resume and torchrun, and leaves nothing on disk. The "ref" copy is dropped before the final adapter is
    saved (drop_reference_adapter)."""
    return load_adapter(model, find_adapter(adapter), model.name_or_path, float32_adapter=True, trainable=True)


def drop_reference_adapter(trainer) -> None:
    """DPO from --init_adapter: remove the frozen "ref" copy of the SFT adapter (load_trainable_adapter), so that
    the output folder holds the trained adapter alone; checkpoints keep it, for --resume."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def check_lora_targets(lora_config, model) -> None:
    """Every name in --lora_target_modules is a layer of this model that LoRA can adapt. peft itself fails only when
    no name matches, and silently skips the others: a typo would train fewer layers than asked."""
    if isinstance(lora_config.target_modules, str):  # all-linear, or a regular expression peft matches itself
        return
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()  # a linear layer, but all-linear leaves it out too
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, torch.nn.Linear) and m is not head}
    )
    for target in sorted(lora_config.target_modules):
        matches = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matches:
            raise ConfigError(
                f"--lora_target_modules: this model has no layer named {target!r}; its linear layers are "
                f"{', '.join(linear)} (or pass all-linear)."
            )
        if not all(isinstance(m, adaptable) for m in matches):
            kind = next(type(m).__name__ for m in matches if not isinstance(m, adaptable))
            raise ConfigError(
                f"--lora_target_modules: {target!r} is a {kind}, which LoRA cannot adapt; its linear layers are "
                f"{', '.join(linear)}."
            )


def merge_adapter(adapter: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "bfloat16") -> Path:
    """Write base + adapter as one plain model (merged weights, safetensors) with the tokenizer and the portable
    chat template, ready for serving engines.

    The base is loaded unquantized in `dtype`: LoRA's update cannot be folded exactly into 4-bit weights, so the
    merged model is the 16-bit base plus the adapter (what the adapter computes on a 16-bit base)."""
    model, tokenizer = load_chat_model(
        adapter, base, QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype=dtype), float32_adapter=True
    )
    merged = model.merge_and_unload()
    documented = Path(adapter) / GENERATION_CONFIG  # the decoding settings the adapter's report measured
    if documented.is_file():
        merged.generation_config = GenerationConfig.from_pretrained(adapter)
    # generate() on the merged folder stops at the template's end of turn, and batches pad with the same id.
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, max_shard_size="5GB")  # transformers 5 always writes safetensors
    save_tokenizer(tokenizer, out_dir)
    return out_dir

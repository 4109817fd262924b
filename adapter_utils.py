"""LoRA adapters: the config from `LoraArguments`; finding, checking and loading a trained adapter on its base; merging
it into a standalone model.
"""

import json
import logging
from pathlib import Path

from checkpoint_utils import ADAPTER_CONFIG, ADAPTER_FILE, latest_checkpoint
from config import PHI_LORA_TARGETS, LoraArguments, ModelArguments, QuantizationArguments
from model_utils import ModelError, load_model, load_tokenizer

logger = logging.getLogger(__name__)


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
    from peft import PeftConfig, PeftModel

    quant_args = quant_args or QuantizationArguments()
    adapter_dir = find_adapter(adapter) if adapter is not None else None
    if adapter_dir is not None:
        trained_on = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
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
        # peft's default upcasts bf16/fp16 LoRA weights to float32: twice their memory, and the LoRA matmuls in
        # float32, for generation that gains nothing from it.
        model = PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=float32_adapter)
    model.eval()
    return model, tokenizer


def merge_adapter(adapter: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "bfloat16") -> Path:
    """Write base + adapter as one plain model (merged weights, safetensors) with the tokenizer and chat template.

    The base is loaded unquantized in `dtype`: LoRA's update cannot be folded exactly into 4-bit weights, so the
    merged model is the 16-bit base plus the adapter (what the adapter computes on a 16-bit base)."""
    model, tokenizer = load_chat_model(
        adapter, base, QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype=dtype), float32_adapter=True
    )
    merged = model.merge_and_unload()
    # generate() on the merged folder stops at the template's end of turn, and batches pad with the same id.
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, max_shard_size="5GB")  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir

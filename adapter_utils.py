"""LoRA adapters from `LoraArguments`: which modules get low-rank updates, and how big they are."""

from peft import LoraConfig

from config import PHI_LORA_TARGETS, LoraArguments


def lora_target_modules(spec: str, model_type: str) -> list[str] | str:
    """'auto': Phi's attention and MLP projections on Phi models; on other architectures every linear layer but
    the output head (peft's 'all-linear'), so --model can name any causal LM. Else a comma list or 'all-linear'."""
    if spec == "auto":
        spec = PHI_LORA_TARGETS if model_type == "phi" else "all-linear"
    if spec == "all-linear":
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def build_lora_config(args: LoraArguments, model_type: str) -> LoraConfig:
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(args.lora_target_modules, model_type),
        bias="none",  # biases stay frozen: the adapter alone is saved and swapped, as in the QLoRA paper
        task_type="CAUSAL_LM",
    )

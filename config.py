"""Every setting of the kit, one dataclass per concern; each field's help says what it does and why its default.

A YAML file under `configs/` sets defaults, command-line flags override them, and an unknown key or flag is an error:

    python train.py --config configs/phi2_oasst1.yaml --max_steps 100
    python train.py --help

The training loop's settings are TRL's `SFTConfig` with our defaults (`train_settings.TrainingConfig`, kept there so
that `import config` stays free of TRL). Parsing lives in `cli_utils.py`.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The modules the original Phi-2 QLoRA recipe adapted: attention projections, the attention output and the MLP.
PHI_LORA_TARGETS = "q_proj,k_proj,v_proj,dense,fc1,fc2"
# transformers' file for a model's own decoding settings; the report writes the ones it measured into the adapter.
GENERATION_CONFIG = "generation_config.json"
MODEL_DECODING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


class UserError(ValueError):
    """A mistake the user can fix (a setting, a file, a folder): the entry points print its message as one line."""


class ConfigError(UserError):
    """A setting that cannot work; the message names the flag and the fix."""


class DataError(UserError):
    """A problem with the user's data; the message says what and where."""


def require(condition: bool, message: str) -> None:
    """A setting's range, written as what must hold (so that NaN fails it too); else a ConfigError."""
    if not condition:
        raise ConfigError(message)


SEED_LIMIT = 2**32  # numpy's and torch's seeds are unsigned 32-bit


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="microsoft/phi-2",
        metadata={"aliases": ["--model"], "help": "Base model: a Hub id or a folder saved with save_pretrained."},
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of the base model."}
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa", metadata={"help": "Attention kernel; sdpa is built into torch and needs no extra package."}
    )


@dataclass
class QuantizationArguments:
    load_in_4bit: bool = field(default=True, metadata={"help": "Load the frozen base in 4 bits (QLoRA)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type; nf4 beats fp4 on normally distributed weights."}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Also quantize the quantization constants (about 0.4 bit per parameter)."}
    )
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "dtype of the matmuls; auto: bf16 on GPUs that have it, fp16 on older ones (in training: the "
            "--bf16/--fp16 precision), fp32 on CPU."
        },
    )
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "dtype that holds the packed 4-bit weights; auto: the compute dtype under FSDP, else uint8."
        },
    )
    dequantize_on_cpu: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata={
            "help": "Generating on CPU: dequantize the 4-bit weights once, not at every token (faster; 8x their "
            "memory); auto: when that fits in half the free memory."
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (QLoRA paper: 64)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator; the update is scaled by alpha/r."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input (QLoRA paper: 0.1)."})
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": f"Modules to adapt (comma list or all-linear); auto: {PHI_LORA_TARGETS} on Phi, else all-linear."
        },
    )

    def __post_init__(self):
        require(self.lora_r >= 1, f"--lora_r must be at least 1, got {self.lora_r}.")
        require(self.lora_alpha > 0, f"--lora_alpha must be above 0, got {self.lora_alpha}.")
        require(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        require(
            any(name.strip() for name in self.lora_target_modules.split(",")),
            "--lora_target_modules names no module: pass a comma list, all-linear or auto.",
        )


@dataclass
class DataArguments:
    dataset: str = field(
        default="OpenAssistant/oasst1",
        metadata={
            "aliases": ["--input"],
            "help": "Training data: OpenAssistant/oasst1 (or hub), or a local file (formats: data_formats.py).",
        },
    )
    dataset_split: str = field(
        default="train", metadata={"aliases": ["--split"], "help": "Split of the Hub data set to train on."}
    )
    eval_split: str | None = field(
        default="validation", metadata={"help": "Held-out split of the Hub data set; empty for none."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out data from a local file."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Share of a local --dataset's trees held out as the dev set (split by tree)."}
    )
    test_fraction: float = field(
        default=0.0, metadata={"help": "Share of the trees held out as the test set, scored only by the report."}
    )
    policy: Literal["auto", "best", "replies", "best_vs_rest", "all_pairs"] = field(
        default="auto",
        metadata={
            "help": "Examples from oasst1 (data_utils.py tells each); auto: best for --method sft, best_vs_rest pairs "
            "for dpo and orpo."
        },
    )
    long_examples: Literal["truncate", "drop"] = field(
        default="truncate",
        metadata={"help": "Training examples longer than --max_length: truncate (keep the start) or drop."},
    )
    langs: str = field(default="", metadata={"help": "Comma-separated language codes to keep; empty: all."})

    def __post_init__(self):
        require(0.0 <= self.eval_fraction < 1.0, f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        require(
            0.0 <= self.test_fraction < 1.0 and self.eval_fraction + self.test_fraction < 1.0,
            f"--test_fraction must be in [0, 1) and leave trees to train on with --eval_fraction, got "
            f"{self.test_fraction} and {self.eval_fraction}.",
        )

    def resolve_policy(self, method: str = "sft") -> None:
        """Set --policy auto to the method's default; refuse a policy that does not fit the method."""
        pairs = method in ("dpo", "orpo")
        if self.policy == "auto":
            self.policy = "best_vs_rest" if pairs else "best"
        wanted = "preference pairs: best_vs_rest or all_pairs" if pairs else "conversations: best or replies"
        require(
            pairs == (self.policy in ("best_vs_rest", "all_pairs")),
            f"--method {method} trains on {wanted} (--policy auto picks the method's default).",
        )

    @property
    def lang_list(self) -> list[str]:
        return [lang.strip() for lang in self.langs.split(",") if lang.strip()]


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling: keep the smallest token set with this mass."}
    )
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens (0: no limit)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1 discourages repeating tokens."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling, for repeatable replies."})

    def __post_init__(self):
        # Values generate() would reject mid-way (or sample nonsense with), refused before the model loads.
        require(self.max_new_tokens >= 1, "--max-new-tokens must be at least 1.")
        require(0 <= self.temperature < math.inf, f"--temperature must be 0 (greedy) or more, got {self.temperature}.")
        require(0 < self.top_p <= 1, "--top-p must be in (0, 1]; 1 keeps every token.")
        require(self.top_k >= 0, "--top-k must be 0 (no limit) or more.")
        require(0 < self.repetition_penalty < math.inf, "--repetition-penalty must be above 0; 1.0 means none.")
        require(self.seed is None or 0 <= self.seed < SEED_LIMIT, f"--seed must be in [0, 2**32), got {self.seed}.")

    @staticmethod
    def model_defaults(folder: str | Path) -> dict:
        """The decoding settings a model or adapter folder documents in its generation_config.json (the report
        writes the ones it measured), as defaults for these fields; {} when there is none."""
        path = Path(folder) / GENERATION_CONFIG
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, or unreadable: today's defaults apply
            return {}
        if not isinstance(saved, dict):
            return {}
        defaults = {name: saved[name] for name in MODEL_DECODING_SETTINGS if isinstance(saved.get(name), int | float)}
        if not saved.get("do_sample", False):
            defaults["temperature"] = 0.0  # greedy
        return defaults

    def describe(self) -> str:
        """'greedy, repetition penalty 1.1, up to 512 new tokens' (or the sampling settings)."""
        decoding = (
            "greedy"
            if self.temperature <= 0
            else f"sampling at temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k}"
        )
        return f"{decoding}, repetition penalty {self.repetition_penalty:g}, up to {self.max_new_tokens} new tokens"

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            return {**kwargs, "do_sample": False}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@dataclass
class ChatModelArguments:
    """Which model answers: shared by inference.py and app.py."""

    adapter: str = field(
        default="model", metadata={"help": "LoRA adapter folder (final adapter, else newest checkpoint)."}
    )
    base: str | None = field(default=None, metadata={"help": "Base model (Hub id or folder); default: the adapter's."})
    no_adapter: bool = field(default=False, metadata={"help": "Answer with the base model alone (needs --base)."})


@dataclass
class ReportArguments:
    final_report: bool = field(
        default=True, metadata={"help": "After training, compare base and tuned on held-out data (see report.py)."}
    )
    report_prompts: int = field(default=10, metadata={"help": "Held-out prompts answered for the clean-stop rate."})
    report_max_new_tokens: int = field(
        default=256, metadata={"help": "Greedy reply budget in the clean-stop test: a reply must end within it."}
    )
    report_repetition_penalty: float = field(
        default=1.0, metadata={"help": "Repetition penalty in the clean-stop test; 1.0 is plain greedy."}
    )
    report_examples: int = field(
        default=3, metadata={"help": "Base and tuned replies shown side by side in the model card (0: none)."}
    )
    report_on: Literal["test", "dev"] = field(
        default="test", metadata={"help": "Held-out part to score: test (dev if there is none), or dev to tune on."}
    )
    license: str = field(
        default="auto", metadata={"help": "License in the model card; auto: the base model's, from its card."}
    )

    def __post_init__(self):
        require(self.report_prompts >= 1, f"--report_prompts must be at least 1, got {self.report_prompts}.")
        require(
            self.report_max_new_tokens >= 1,
            f"--report_max_new_tokens must be at least 1, got {self.report_max_new_tokens}.",
        )
        require(
            0 < self.report_repetition_penalty < math.inf,
            f"--report_repetition_penalty must be above 0 (1.0: none), got {self.report_repetition_penalty}.",
        )
        require(
            self.report_examples >= 0, f"--report_examples must be 0 (none shown) or more, got {self.report_examples}."
        )

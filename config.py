"""Every setting of the kit, one dataclass per concern, each default with its reason.

A YAML file under `configs/` sets defaults, command-line flags override them, and an unknown key or flag is an
error (the QLoRA repo silently dropped unknown flags, so its own launch scripts set options that did nothing):

    python train.py --config configs/phi2_oasst1.yaml --max_steps 100
    python train.py --help

Training-loop settings are TRL's `SFTConfig` (see `TrainingConfig` below for the defaults we change).
"""

import difflib
import enum
import functools
import logging
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, NoReturn, Union

logger = logging.getLogger(__name__)

# The modules the original Phi-2 QLoRA recipe adapted: attention projections, the attention output and the MLP.
PHI_LORA_TARGETS = "q_proj,k_proj,v_proj,dense,fc1,fc2"


class ConfigError(ValueError):
    """A setting the user chose that cannot work; its message names the flag and the fix."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="microsoft/phi-2",
        metadata={
            "aliases": ["--model"],
            "help": "Base model: a Hub id or a local folder saved with save_pretrained. Phi-2 (2.7B) is the model "
            "this kit is tuned for; any causal LM works (LoRA then targets every linear layer but the output head).",
        },
    )
    model_revision: str | None = field(
        default=None,
        metadata={
            "help": "Hub revision (branch, tag or commit) of the base model; pin a commit for reproducible runs."
        },
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa",
        metadata={"help": "Attention kernel. sdpa is built into torch, fast, and needs no extra package."},
    )


@dataclass
class QuantizationArguments:
    load_in_4bit: bool = field(
        default=True,
        metadata={"help": "Load the frozen base in 4 bits (QLoRA). Phi-2 then takes about 1.8 GB instead of 5.6 GB."},
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4",
        metadata={"help": "4-bit data type. nf4 suits normally distributed weights and beats fp4 (QLoRA paper)."},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True,
        metadata={
            "help": "Also quantize the quantization constants: saves about 0.4 bit per parameter, no quality cost."
        },
    )
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "dtype of the matmuls on the dequantized weights. auto: bfloat16 on GPUs that support it (Phi-2 "
            "overflows in fp16 attention), float16 on older GPUs (with a warning), float32 on CPU."
        },
    )
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "dtype that holds the packed 4-bit weights (the values are the same either way). FSDP shards "
            "only float tensors of one dtype, so FSDP-QLoRA needs the compute dtype here. auto: the compute dtype "
            "under FSDP (accelerate launch with configs/accelerate/fsdp_qlora.yaml), uint8 otherwise."
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (QLoRA paper: 64)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator; the update is scaled by alpha/r."})
    lora_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the LoRA input; 0.1 as in the QLoRA paper for models under 13B."}
    )
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "Comma-separated module names to adapt, or 'all-linear'. auto: Phi's "
            f"{PHI_LORA_TARGETS} for Phi models, every linear layer except the output head for other architectures."
        },
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="OpenAssistant/oasst1",
        metadata={
            "aliases": ["--input"],
            "help": "Training data: 'OpenAssistant/oasst1' (or 'hub') for the Hub data set, or a local file: oasst1 "
            "rows (.jsonl/.parquet with the Hub's columns), an oasst1 trees export (.jsonl, one tree per line), "
            '{"messages": [...]} jsonl, or text lines "### Human: ... ### Assistant: ...".',
        },
    )
    dataset_split: str = field(
        default="train", metadata={"aliases": ["--split"], "help": "Split of the Hub data set to train on."}
    )
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Held-out split of the Hub data set (used when --dataset is the Hub one). Empty: none."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out data from a local file (same formats as --dataset)."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this share of a local --dataset's conversation trees for evaluation (split by tree, so "
            "no tree is on both sides). 0: none."
        },
    )
    policy: Literal["best", "replies"] = field(
        default="best",
        metadata={
            "help": "best: one multi-turn conversation per tree along the best-ranked replies, loss on every "
            "assistant turn. replies: one example per best-ranked reply at any depth, its ancestors as context, "
            "loss on that reply only."
        },
    )
    long_examples: Literal["truncate", "drop"] = field(
        default="truncate",
        metadata={
            "help": "Examples longer than --max_length: truncate (keep the start, as the original recipe) or drop. "
            "Truncation cuts the EOS that ends the reply, so on short budgets drop teaches the model to stop."
        },
    )
    langs: str = field(
        default="",
        metadata={"help": "Comma-separated language codes to keep (e.g. en,de). Empty: all languages."},
    )

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")

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

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`."""
        if self.temperature <= 0:
            return {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": False,
                "repetition_penalty": self.repetition_penalty,
            }
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass
class ReportArguments:
    final_report: bool = field(
        default=True,
        metadata={
            "help": "After training, compare base and tuned model on the held-out data and write eval.json, "
            "loss.png and a model card (README.md) to --output_dir (see evaluate.py)."
        },
    )
    report_prompts: int = field(
        default=10, metadata={"help": "Held-out prompts answered by base and tuned model for the clean-stop rate."}
    )
    report_max_new_tokens: int = field(
        default=256, metadata={"help": "Reply budget (greedy) in the clean-stop test: a reply must end within it."}
    )
    report_repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Repetition penalty in the clean-stop test (greedy either way). 1.0: none, plain greedy. Small "
            "models can loop under plain greedy decoding and never stop, whatever they learned."
        },
    )
    report_examples: int = field(default=3, metadata={"help": "Base and tuned replies shown side by side."})


@functools.cache
def _training_config_class() -> type:
    # TrainingConfig subclasses TRL's SFTConfig, whose import pulls in peft and bitsandbytes (seconds). It is built on
    # first use, so the light entry points (data export, inference --help) start fast.
    from trl import SFTConfig

    @dataclass
    class TrainingConfig(SFTConfig):
        """TRL's SFTConfig with the QLoRA recipe's defaults and device-aware precision and optimizer.

        Memory: the 4-bit base, gradient checkpointing and packing are set here; TRL's SFTTrainer always computes the
        loss in chunks straight from the LM head's weight, so the (tokens x vocabulary) logits are never built (it
        works with PEFT: the head is not adapted). --activation_offloading (TRL) trades speed for activation memory.
        """

        output_dir: str = field(
            default="model",
            metadata={"help": "Where checkpoints, the final adapter, tokenizer and config are written."},
        )
        learning_rate: float = field(
            default=2e-4, metadata={"help": "Peak learning rate (QLoRA paper: 2e-4 for 7B-13B)."}
        )
        lr_scheduler_type: str = field(
            default="constant", metadata={"help": "Learning-rate schedule after warmup (QLoRA repo: constant)."}
        )
        warmup_steps: float = field(
            default=0.05,
            metadata={"help": "Warmup: a float in [0, 1) is a share of all steps, an integer a step count."},
        )
        max_steps: int = field(default=700, metadata={"help": "Optimizer steps (original recipe: 700)."})
        per_device_train_batch_size: int = field(
            default=4,
            metadata={
                "help": "Micro-batch size per device: rows of up to --max_length tokens. With --packing a row holds "
                "as many whole conversations as fit (oasst1's single-turn examples average 233 tokens), without it "
                "one conversation."
            },
        )
        gradient_accumulation_steps: int = field(
            default=2,
            metadata={
                "help": "Micro-batches per optimizer step. 4 packed rows x 2 = about 4,000 real tokens a step, what "
                "the original recipe's 4 padded examples x 4 held on oasst1 (16 x 233), in half the forward passes. "
                "With --packing false use 4."
            },
        )
        max_length: int | None = field(
            default=512,
            metadata={
                "help": "Tokens per example (and per packed row); longer conversations are cut at the end. With "
                "--packing false a batch is padded to its longest example, up to this length."
            },
        )
        packing: bool = field(
            default=True,
            metadata={
                "help": "Pack conversations into rows of --max_length tokens with TRL's best-fit-decreasing packing "
                "and run each micro-batch padding-free (one row, no pad tokens). Positions restart at every "
                "conversation and transformers builds a block-diagonal mask from them (sdpa, eager, flex) or cuts "
                "the flash-attention kernel at the boundaries, so conversations never attend to each other. Where "
                "a model's attention cannot keep them apart (checked on the model before training), training falls "
                "back to length-grouped batches with a warning. The original recipe padded every batch of 4 to its "
                "longest example: 40%% of the compute went on padding on oasst1 (see BENCHMARKS.md)."
            },
        )
        gradient_checkpointing: bool = field(
            default=True,
            metadata={
                "help": "Recompute activations in the backward pass instead of storing them (non-reentrant "
                "checkpointing): far less memory for about 30%% more compute. Turn off when memory is plentiful."
            },
        )
        max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping (QLoRA paper: 0.3)."})
        optim: str = field(
            default="paged_adamw_32bit",
            metadata={
                "help": "Optimizer. Paged AdamW moves optimizer state to CPU RAM under memory pressure instead of "
                "crashing (QLoRA paper; CUDA only, on CPU it falls back to adamw_torch with a warning). "
                "paged_adamw_8bit keeps the state in 8 bits: a quarter of the memory, for a tiny LoRA state."
            },
        )
        assistant_only_loss: bool = field(
            default=True, metadata={"help": "Train on assistant tokens (and their EOS) only, not on the human turns."}
        )
        bf16: bool | None = field(
            default=None,
            metadata={
                "help": "bf16 mixed precision. Default: on where the GPU supports it, off on CPU (on CPUs with bf16 "
                "instructions --bf16 true works and is faster)."
            },
        )
        save_steps: float = field(default=100, metadata={"help": "Save a checkpoint every N steps."})
        save_total_limit: int | None = field(default=3, metadata={"help": "Keep only the newest N checkpoints."})
        logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
        report_to: None | str | list[str] = field(
            default="tensorboard",
            metadata={"help": "Where to send training logs: tensorboard (in output_dir/runs), wandb, trackio, none."},
        )
        ddp_find_unused_parameters: bool | None = field(
            default=False,
            metadata={
                "help": "Under torchrun/accelerate (DDP): search each step for parameters that got no gradient. Off: "
                "every LoRA weight gets one in every step, so the search would only cost time (the Trainer's "
                "default turns it on for PEFT models)."
            },
        )
        resume: bool = field(
            default=False,
            metadata={
                "help": "Continue from the latest complete checkpoint in --output_dir (a checkpoint whose save was "
                "cut short is skipped). Also extends a finished run to a larger --max_steps."
            },
        )
        overwrite: bool = field(
            default=False,
            metadata={
                "help": "Start over in an --output_dir that holds a previous run: its checkpoints and adapter are "
                "deleted when the new run starts training. Without it a finished run is never overwritten."
            },
        )

        def __post_init__(self):
            # Decide precision and optimizer for the hardware before SFTConfig validates them.
            import torch

            if torch.cuda.is_available():
                if self.bf16 is None and not self.fp16:
                    self.bf16 = torch.cuda.is_bf16_supported()
                    if not self.bf16:
                        self.fp16 = True
                        logger.warning(
                            "This GPU has no bf16: training in fp16. Phi-2 can overflow in fp16 attention; "
                            "watch for a nan loss."
                        )
            else:
                # CPU: float32 by default. bf16 only when asked for and the CPU has bf16 instructions (AVX512-BF16,
                # AMX), where it is about 1.3x faster.
                cpu_bf16 = (
                    bool(self.bf16)
                    and torch.backends.mkldnn.is_available()
                    and (torch.ops.mkldnn._is_mkldnn_bf16_supported())
                )
                if (self.bf16 and not cpu_bf16) or self.fp16:
                    logger.warning("No CUDA GPU: mixed precision is off, training in float32 on CPU.")
                self.bf16, self.fp16 = cpu_bf16, False
                # The model is on the CPU (model_utils.device_map), so the Trainer must be too; under torchrun this
                # is also what makes accelerate train the processes together (gloo) rather than each on its own.
                self.use_cpu = True
                if "paged" in self.optim or "bnb" in self.optim or "8bit" in self.optim:
                    logger.warning("--optim %s needs CUDA: using adamw_torch on CPU.", self.optim)
                    self.optim = "adamw_torch"
            super().__post_init__()

    # The Trainer pickles its arguments into each checkpoint: give the class the name pickle finds through the
    # module's __getattr__ below.
    TrainingConfig.__qualname__ = "TrainingConfig"
    return TrainingConfig


def __getattr__(name: str):
    if name == "TrainingConfig":
        return _training_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_train_args(args: list[str] | None = None):
    """--config YAML defaults, then CLI overrides: (model, quantization, lora, data, report, training) arguments."""
    from trl import TrlParser

    dataclasses = (ModelArguments, QuantizationArguments, LoraArguments, DataArguments, ReportArguments)
    parser = one_line_errors(TrlParser((*dataclasses, _training_config_class())))
    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        position = args.index("--config") + 1
        if position == len(args):
            raise ConfigError("--config needs a YAML file.")
        check_yaml_config(args[position], (*dataclasses, _training_config_class()))
    return parser.parse_args_and_config(args)


def light_argument_parser(dataclass_types, **kwargs):
    """transformers' HfArgumentParser, without importing transformers when it is not loaded yet.

    `import transformers` takes 1.5-2 s here (it pulls in huggingface_hub and its HTTP stack), which would make
    `inference.py --help` slow. The parser's own module needs only the standard library and yaml, so it is loaded
    from its file on its own; if a future version gives it other imports, the normal import is used."""
    import argparse
    import importlib.util
    from pathlib import Path

    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Keeps the docstring's command examples as written, and shows each flag's default."""

    kwargs.setdefault("formatter_class", HelpFormatter)
    if "transformers" not in sys.modules:
        package = importlib.util.find_spec("transformers")
        spec = importlib.util.spec_from_file_location("_hf_argparser", Path(package.origin).parent / "hf_argparser.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            return module.HfArgumentParser(dataclass_types, **kwargs)
        except ImportError:
            pass
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types, **kwargs)


def one_line_errors(parser):
    """argparse prints the whole usage (hundreds of lines with SFTConfig) before a bad flag's error: one line."""

    def error(message: str) -> NoReturn:
        fail(f"{message} (see --help)")

    parser.error = error
    return parser


def check_yaml_config(path: str, dataclass_types: tuple) -> None:
    """What TrlParser does not check in a --config file: that it reads, that every key is a setting (with the
    closest name when not), and that every value has the setting's type (TrlParser passes YAML values through)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must be a YAML mapping of settings (key: value lines).")
    settings = {}
    for cls in dataclass_types:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):  # an annotation that cannot be resolved: no type check for that class
            hints = {}
        settings.update({f.name: hints.get(f.name, typing.Any) for f in fields(cls) if f.init})
    for key, value in config.items():
        if key == "env":  # TrlParser's environment variables
            continue
        if key not in settings:
            close = difflib.get_close_matches(str(key), settings, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (python train.py --help lists the settings)"
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}.")
        if not value_fits(value, settings[key]):
            raise ConfigError(
                f"{path}: {key} must be {type_name(settings[key])}, got {value!r} ({type(value).__name__})."
            )


def value_fits(value, annotation) -> bool:
    """Whether a YAML value can become a setting of this type (argparse converts strings like "2e-4" to numbers)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(value_fits(value, option) for option in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0")
    if annotation in (int, float):
        if isinstance(value, bool):
            return False
        if isinstance(value, str):
            try:
                annotation(value)
            except ValueError:
                return False
            return True
        return isinstance(value, int) or (annotation is float and isinstance(value, float))
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {member.value for member in annotation} or isinstance(value, str)
    return True  # a type we do not know: the parser decides


def type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text (quote it)"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def fail(message: str, code: int = 2) -> NoReturn:
    """A user's mistake: one clear line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)

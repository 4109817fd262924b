"""The training run's settings: TRL's SFTConfig with the QLoRA recipe's defaults, and the parser of train.py's flags.

Every setting is refused before anything loads when it is out of range or cannot work together with the others
(an --init_adapter folder that holds no adapter, --push_to_hub without a token), in one line that names the flag.
"""

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from trl import SFTConfig, TrlParser

from adapter_utils import find_adapter
from cli_utils import check_yaml_config, one_line_errors
from config import (
    SEED_LIMIT,
    ConfigError,
    DataArguments,
    LoraArguments,
    ModelArguments,
    QuantizationArguments,
    ReportArguments,
    require,
)
from hub_utils import check_push_settings
from quantization_utils import fsdp_enabled, training_precision


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig with the QLoRA recipe's defaults; precision and optimizer are fitted to the device.

    Memory: TRL's SFTTrainer computes the loss in chunks straight from the LM head's weight, so the (tokens x
    vocabulary) logits are never built; --activation_offloading (TRL) trades speed for activation memory.
    """

    output_dir: str = field(default="model", metadata={"help": "Where checkpoints and the final adapter are written."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (QLoRA paper: 2e-4)."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule after warmup (QLoRA repo: constant)."}
    )
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Warmup: a float in [0, 1) is a share of all steps, an integer a step count."}
    )
    max_steps: int = field(
        default=700,
        metadata={"help": "Optimizer steps (original recipe: 700); -1: --num_train_epochs epochs instead."},
    )
    per_device_train_batch_size: int = field(
        default=4,
        metadata={"help": "Micro-batch per device: packed rows of --max_length tokens (conversations unpacked)."},
    )
    gradient_accumulation_steps: int = field(
        default=2, metadata={"help": "Micro-batches per optimizer step (use 4 with --packing false, as the original)."}
    )
    max_length: int | None = field(
        default=512,
        metadata={"help": "Tokens per example and per packed row; longer conversations are cut at the end."},
    )
    packing: bool = field(
        default=True, metadata={"help": "Pack conversations into padding-free rows that never attend to each other."}
    )
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass: far less memory, a slower step."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of --activation_checkpointing (transformers 5 renamed it)."}
    )
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping (QLoRA paper: 0.3); 0: none."})
    optim: str = field(
        default="paged_adamw_32bit",
        metadata={"help": "Optimizer; paged AdamW survives memory spikes on CUDA (adamw_torch on CPU)."},
    )
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Train on assistant tokens (and their EOS) only, not on the human turns."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on GPUs with native bf16 (sm_80+), else off."}
    )
    fp16: bool | None = field(
        default=None,
        metadata={"help": "fp16 mixed precision; default: on GPUs without native bf16 (T4, V100), off elsewhere."},
    )
    save_steps: float = field(
        default=100, metadata={"help": "Save a checkpoint every N steps (below 1: that share of all steps)."}
    )
    save_total_limit: int | None = field(
        default=3, metadata={"help": "Keep only the newest N checkpoints (0: keep them all)."}
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log the loss every N steps (below 1: that share of all steps)."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log a nan/inf loss as the mean of earlier ones (off: as nan); the run stops on it anyway."},
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Where training logs go: tensorboard, wandb, trackio or none."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Under DDP, search for weights without gradients (every LoRA weight has one)."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "After the report, upload the output folder (adapter, model card) to the Hub."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository for --push_to_hub (user/name); default: --output_dir's name."}
    )
    method: Literal["sft", "dpo", "orpo"] = field(
        default="sft",
        metadata={"help": "sft: learn the replies; dpo, orpo: learn oasst1's rankings from preference pairs."},
    )
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "--method dpo: start from this SFT adapter, which is also DPO's reference (else the base)."},
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO: how strongly to stay near the reference; ORPO: weight of its odds loss."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the newest complete checkpoint in --output_dir."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a previous run in --output_dir (deleted when training starts)."}
    )

    def __post_init__(self):
        if self.gradient_checkpointing is not None:  # the old name given: transformers maps it (with a warning)
            self.activation_checkpointing = None
        self.check_ranges()
        self.bf16, self.fp16, self.optim = training_precision(self.bf16, self.fp16, self.optim)
        no_kwargs = self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None
        if fsdp_enabled() and no_kwargs:
            # PEFT's FSDP-QLoRA guide checkpoints reentrant: with FSDP1's flattened parameters (use_orig_params false)
            # the non-reentrant recompute sees other tensor shapes than the forward
            # (https://github.com/huggingface/transformers/issues/28499).
            self.activation_checkpointing_kwargs = {"use_reentrant": True}
        if not torch.cuda.is_available():
            # The model is on the CPU (model_utils.device_map), so the Trainer must be too; under torchrun this is
            # also what makes accelerate train the processes together (gloo) rather than each on its own.
            self.use_cpu = True
        super().__post_init__()

    def check_ranges(self) -> None:
        """The loop settings we set or users commonly set, refused before anything loads when out of range (the
        Trainer would fail on some mid-way, or train nonsense on others: a negative step count trains epochs)."""
        require(0 < self.learning_rate < math.inf, f"--learning_rate must be above 0, got {self.learning_rate}.")
        require(
            self.max_steps >= 1 or self.max_steps == -1,
            f"--max_steps must be at least 1, or -1 to train --num_train_epochs epochs, got {self.max_steps}.",
        )
        require(
            0 < self.num_train_epochs < math.inf, f"--num_train_epochs must be above 0, got {self.num_train_epochs}."
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, f"--{name} must be at least 1, got {getattr(self, name)}.")
        require(
            self.max_length is None or self.max_length >= 1,
            f"--max_length must be at least 1 token, got {self.max_length}.",
        )
        require(
            self.warmup_steps == 0 or steps_or_share(self.warmup_steps),
            f"--warmup_steps must be a share of the steps in [0, 1) or a whole number of steps, got "
            f"{self.warmup_steps}.",
        )
        require(
            0 <= self.max_grad_norm < math.inf,
            f"--max_grad_norm must be 0 (no clipping) or more, got {self.max_grad_norm}.",
        )
        for name in ("save_steps", "logging_steps", "eval_steps"):
            steps = getattr(self, name)
            require(
                steps is None or steps_or_share(steps),
                f"--{name} must be a whole number of steps, or a share of the steps in (0, 1), got {steps}.",
            )
        require(
            self.save_total_limit is None or self.save_total_limit >= 0,
            f"--save_total_limit must be 0 (keep every checkpoint) or more, got {self.save_total_limit}.",
        )
        require(0 <= self.seed < SEED_LIMIT, f"--seed must be in [0, 2**32), got {self.seed}.")
        require(0 < self.beta < math.inf, f"--beta must be above 0, got {self.beta}.")
        require(
            not self.init_adapter or self.method == "dpo",
            "--init_adapter starts --method dpo from an SFT adapter; ORPO trains in one stage from the base, and an "
            "SFT run continues with --resume.",
        )


def steps_or_share(value: float) -> bool:
    """A whole number of steps, or a share of all steps in (0, 1): how transformers reads its *_steps floats."""
    return 0 < value < 1 or (1 <= value < math.inf and value == int(value))


SETTINGS = (ModelArguments, QuantizationArguments, LoraArguments, DataArguments, ReportArguments, TrainingConfig)


def parse_train_args(args: list[str] | None = None):
    """--config YAML defaults, then CLI overrides: (model, quantization, lora, data, report, training) arguments."""
    parser = one_line_errors(TrlParser(SETTINGS))
    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        position = args.index("--config") + 1
        if position == len(args):
            raise ConfigError("--config needs a YAML file.")
        check_yaml_config(args[position], SETTINGS)
    try:
        parsed = parser.parse_args_and_config(args)
    except ValueError as e:  # a dataclass's own check (ours, or SFTConfig's)
        raise ConfigError(str(e)) from None
    _, _, _, data_args, report_args, training_args = parsed
    data_args.resolve_policy(training_args.method)
    if training_args.init_adapter:
        require(
            Path(training_args.init_adapter).is_dir(),
            f"--init_adapter {training_args.init_adapter}: no such folder; pass the output folder of an SFT run.",
        )
        find_adapter(training_args.init_adapter)  # an adapter or a checkpoint of one, before anything loads
    if training_args.push_to_hub:
        check_push_settings(training_args, report_args.final_report)
    return parsed

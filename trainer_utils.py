"""Training: TRL's SFTConfig with the QLoRA recipe's defaults, the trainer and its checks, and a clean stop on signals.

The packing story, told once: with --packing (the default) TRL packs whole conversations best-fit-decreasing into rows
of --max_length tokens and runs each micro-batch padding-free (one row, no pad tokens). Positions restart at every
conversation, and transformers builds a block-diagonal mask from them (sdpa, eager, flex) or cuts the flash-attention
kernel at the restarts, so conversations never attend to each other. That holds only for attention that reads the
position ids: before training, `packed_examples_stay_apart` measures it on the model, and where it fails training falls
back to length-grouped batches with a warning. The original recipe padded every batch to its longest example; what
that cost is in BENCHMARKS.md.
"""

import contextlib
import copy
import gc
import logging
import math
import signal
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainerCallback
from trl import SFTConfig

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
from quantization_utils import fsdp_enabled, training_precision
from workarounds import (
    RestoreTrainableDtypesOnResume,
    attention_builds_packing_masks,
    attention_implementation,
    keep_4bit_weights_trainable_on_cpu,
)

logger = logging.getLogger(__name__)


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
        metadata={"help": "Recompute activations in the backward pass: far less memory, ~30%% slower."},
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
            # the non-reentrant recompute sees other tensor shapes than the forward (transformers issue 28499).
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
    from trl import TrlParser

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
        from pathlib import Path

        from adapter_utils import find_adapter

        require(
            Path(training_args.init_adapter).is_dir(),
            f"--init_adapter {training_args.init_adapter}: no such folder; pass the output folder of an SFT run.",
        )
        find_adapter(training_args.init_adapter)  # an adapter or a checkpoint of one, before anything loads
    if training_args.push_to_hub:
        from hub_utils import check_push_settings

        check_push_settings(training_args, report_args.final_report)
    return parsed


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's trainer for --method: SFTTrainer (it tokenizes with the chat template, masks everything but assistant
    turns and their EOS from the loss, packs the conversations unless the model's attention would mix them),
    DPOTrainer or ORPOTrainer (prompt/chosen/rejected pairs in the same template). Each wraps the model in the LoRA
    adapter (or continues --init_adapter) and runs the loop; its training steps report their loss to a
    `StopOnNonFiniteLoss` callback."""
    if peft_config is not None and not training_args.init_adapter:
        from adapter_utils import check_lora_targets

        check_lora_targets(peft_config, model)  # before the trainer, which would skip a misspelt name silently
    quantized = getattr(model, "is_loaded_in_4bit", False)
    if quantized:
        keep_4bit_weights_trainable_on_cpu(model)  # before the packing check below runs the model without gradients
    if training_args.method == "sft":
        fall_back_to_length_grouping_if_packing_leaks(model, training_args)
    if quantized and not fsdp_enabled():
        # Not under FSDP: it flattens each decoder layer into one tensor of one dtype, the 4-bit storage dtype.
        keep_norms_in_float32(model)
    if training_args.init_adapter:
        model, peft_config = load_trainable_adapter(model, training_args.init_adapter), None
    nonfinite = StopOnNonFiniteLoss()
    # After the packing check, which may turn packing off: the trainer's arguments are a copy.
    trainer_class, trainer_args = method_trainer(training_args)

    class QLoRATrainer(RestoreTrainableDtypesOnResume, trainer_class):
        """TRL's trainer that resumes in the LoRA weights' own dtype (workarounds.py) and stops on a nan/inf loss."""

        nonfinite_loss = nonfinite

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            nonfinite.observe(loss)
            return loss

    trainer = QLoRATrainer(
        model=model,
        args=trainer_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[nonfinite],
    )
    if not training_args.bf16:  # fp16, or float32 on CPU
        keep_trainable_weights_in_float32(trainer.model)
    return trainer


def method_trainer(training_args):
    """The TRL trainer class for --method, and its arguments: ours for SFT; for DPO and ORPO, their config classes
    filled from ours (the shared Trainer settings, --max_length and --beta). The Trainer would create the Hub
    repository now and push the folder at every checkpoint and when it saves the adapter, before the report; train.py
    uploads the finished folder once, after it (hub_utils.push_run)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    if training_args.method == "sft":
        from trl import SFTTrainer

        trainer_args = copy.copy(training_args)
        trainer_args.push_to_hub = False
        return SFTTrainer, trainer_args
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    shared |= {"push_to_hub": False, "max_length": training_args.max_length, "beta": training_args.beta}
    if training_args.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig(**shared)
    # TRL 1.16 keeps ORPO under trl.experimental (README, "Preference tuning"): its API may change between releases.
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from workarounds import TemplateTokensInOrpo

    return type("ORPOTrainer", (TemplateTokensInOrpo, ORPOTrainer), {}), ORPOConfig(**shared)


def load_trainable_adapter(model, adapter: str):
    """--init_adapter on the prepared base, trainable. DPOTrainer, given a PEFT model and no reference model, keeps a
    frozen copy of this adapter under the name "ref" and computes the reference log-probs through it: the reference
    is the SFT policy, on the same base in memory (no second copy of the base), for a LoRA-sized copy of weights.
    We chose it over TRL's precomputed reference log-probs (precompute_ref_log_probs), which also needs no second base
    but scores the whole training set before the first step and caches it in a datasets cache file keyed by hashes of
    the data and the model; the reference adapter costs one no-grad forward per step instead, works the same for the
    dev set, --resume and torchrun, and leaves nothing on disk. The "ref" copy is dropped before the final adapter is
    saved (drop_reference_adapter)."""
    from adapter_utils import find_adapter, load_adapter

    return load_adapter(model, find_adapter(adapter), model.name_or_path, float32_adapter=True, trainable=True)


def drop_reference_adapter(trainer) -> None:
    """DPO from --init_adapter: remove the frozen "ref" copy of the SFT adapter (load_trainable_adapter), so that
    the output folder holds the trained adapter alone; checkpoints keep it, for --resume."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def keep_norms_in_float32(model) -> None:
    """Store the normalization layers' weights in float32, as peft's `prepare_model_for_kbit_training` does, and
    nothing else: peft upcasts every parameter that is not 4-bit, which for Phi-2 includes the untied embedding and
    output head (about 0.5 GB more; README, "GPUs and precision"), and which TRL's ORPOTrainer still applies itself.
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
    float32 gradients only ("not implemented for 'BFloat16'", TRL issue 4901). In float32 (CPU) every LoRA matmul
    would run in bf16, which a CPU without bf16 instructions emulates: the demo's steps took 15 s instead of 8.5 s
    (BENCHMARKS.md), and the updates were rounded to bf16. The optimizer does not exist yet, so casting back here is
    the whole fix, and --resume keeps these dtypes (workarounds.RestoreTrainableDtypesOnResume)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def release_training_state(trainer) -> None:
    """Let go of the model, the optimizer and the scheduler (the trainer's, its callbacks' and accelerate's
    references) and return their memory, so that what comes next (the report) loads its own model next to nothing
    of training's. The trainer keeps its state: steps and log history."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    handler = trainer.callback_handler
    handler.model = handler.optimizer = handler.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def packed_examples_stay_apart(model) -> bool:
    """Whether this model, with its attention implementation, keeps examples packed into one row apart: run two
    examples packed in one row, change the first one's tokens, and check that the second one's logits stay the same."""
    if any(p.device.type == "meta" for p in model.parameters()):
        # FSDP's memory-efficient loading leaves the weights on the meta device in all but the first process.
        return attention_builds_packing_masks(model)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first, other_first, second = (torch.randint(0, min(vocab, 1000), (n,), generator=generator) for n in (6, 6, 7))
    position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None].to(model.device)
    was_training = model.training
    model.eval()
    try:
        logits = [
            model(
                input_ids=torch.cat([ids, second])[None].to(model.device), position_ids=position_ids, use_cache=False
            )
            .logits[0, 6:]
            .float()
            for ids in (first, other_first)
        ]
    finally:
        model.train(was_training)
    # Kept apart, the second example's logits come out of the same kernels on the same inputs: equal. Mixed, they
    # move by a large share of their scale. 1e-2 leaves room for bf16 rounding in kernels that are not deterministic.
    scale = logits[0].abs().max().clamp(min=1e-6)
    return bool(((logits[0] - logits[1]).abs().max() / scale) < 1e-2)


def fall_back_to_length_grouping_if_packing_leaks(model, training_args) -> None:
    """Turn packing off (and group batches by length instead) when the model's attention would mix packed examples."""
    if not (training_args.packing or training_args.padding_free or training_args.eval_packing):
        return
    if packed_examples_stay_apart(model):
        return
    logger.warning(
        "Packing is off: with attn_implementation=%s this model lets examples packed into one row attend to each "
        "other. Training on batches grouped by length instead (less padding than random batches, more than "
        "packing). Each micro-batch now holds %d conversations instead of about twice as many: raise "
        "--gradient_accumulation_steps to keep the examples per step.",
        attention_implementation(model),
        training_args.per_device_train_batch_size,
    )
    training_args.packing = training_args.padding_free = training_args.eval_packing = False
    training_args.train_sampling_strategy = "group_by_length"


def global_batch_message(trainer) -> str:
    """Processes x micro-batch x accumulation = examples (packed rows when packing, pairs for DPO and ORPO) per
    optimizer step, in the Trainer's own numbers."""
    from trl import SFTTrainer

    args = trainer.args
    processes = f"{args.world_size} process" + ("es" if args.world_size > 1 else "")
    if not isinstance(trainer, SFTTrainer):
        unit = "preference pairs"
    elif getattr(args, "packing", False):
        unit = f"packed rows of up to {args.max_length} tokens"
    else:
        unit = "examples"
    message = (
        f"{processes} x micro-batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps} = "
        f"global batch {trainer.get_total_train_batch_size(args)} {unit} per optimizer step"
    )
    if args.n_gpu > 1:  # one process that sees several GPUs: a 4-bit model stays on the first, with their batches
        message += (
            f". One process sees {args.n_gpu} GPUs but trains on the first only, with a {args.n_gpu}x micro-batch: "
            f"launch with `torchrun --nproc_per_node {args.n_gpu} train.py ...` to use them all."
        )
    return message


class StopOnSignal(TrainerCallback):
    """After Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, `kill`): save a checkpoint at the end of the current
    optimizer step and stop, so that --resume continues exactly there. Installed by `stop_on_signal`."""

    def __init__(self):
        self.signal_name: str | None = None

    def handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: give up on the clean stop
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: saving a checkpoint after this step, then stopping (again to abort).", self.signal_name)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Under torchrun each process gets the signal at its own moment: agree on the step to stop at, or one
            # process would wait forever for the others in the next step's gradient all-reduce.
            stop = torch.tensor(int(self.signal_name is not None), device=args.device)
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            if stop.item() and self.signal_name is None:
                self.signal_name = "SIGTERM"  # received by another process
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def stop_on_signal(trainer):
    """`with stop_on_signal(trainer) as stop: trainer.train()`; afterwards `stop.signal_name` says whether a signal
    stopped the run. The previous handlers are back once the block ends."""
    callback = StopOnSignal()
    trainer.add_callback(callback)
    # The stop on a nan/inf loss keeps the last word on saving: a signal in that same step must not save its state.
    nonfinite = trainer.pop_callback(StopOnNonFiniteLoss)
    if nonfinite is not None:
        trainer.add_callback(nonfinite)
    previous = {signum: signal.signal(signum, callback.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield callback
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(callback)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the end of the first optimizer step whose loss is nan or inf, without evaluating or saving that step:
    the newest checkpoint on disk stays the last good one. Afterwards `step` is the step it stopped at (None: it did
    not). The trainer's `training_step` reports each micro-batch's loss to `observe`.

    fp16 overflow (Phi-2's attention on a T4) shows up this way; so does a learning rate far too high. Left running,
    such a run only logs nan to the end, and its later checkpoints hold nan weights (or, under fp16, weights the
    GradScaler stopped updating)."""

    def __init__(self):
        self.step: int | None = None
        self.nonfinite: torch.Tensor | None = None  # on the device: read once per optimizer step, not per micro-batch

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad

    def on_step_end(self, args, state, control, **kwargs):
        if self.nonfinite is None:
            return control
        stop = self.nonfinite.to(device=args.device, dtype=torch.int32)
        self.nonfinite = None
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Every process stops at the same step, or the others would wait forever in the next all-reduce.
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if stop.item():
            self.step = state.global_step
            control.should_training_stop = True
        return self.keep_the_broken_state_out(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.keep_the_broken_state_out(control)

    def keep_the_broken_state_out(self, control):
        if self.step is not None:
            control.should_save = control.should_evaluate = False
        return control


def nonfinite_loss_message(args, step: int) -> str:
    """What went wrong at `step` of a run with these training arguments, where its last good checkpoint is, and what
    to do: one line."""
    from checkpoint_utils import latest_checkpoint

    last = latest_checkpoint(args.output_dir)
    if last is not None:
        kept = f"{last} is the last good checkpoint (nothing of step {step} was saved)"
        resume = "; then --resume continues from it"
    else:
        kept, resume = "no checkpoint was saved before it", ""
    if args.fp16:
        return (
            f"the training loss became nan/inf at step {step}: float16 overflowed (Phi-2's activations can exceed its "
            f"range); {kept}. Train on a GPU with bf16 (compute capability 8.0 or newer: A100, L4, RTX 30xx and "
            f"newer), or compute in float32: --bnb_4bit_compute_dtype float32 --fp16 false (slower){resume}."
        )
    return (
        f"the training loss became nan/inf at step {step}; {kept}. Lower --learning_rate (now {args.learning_rate:g}) "
        f"and start again with --overwrite, or check the data."
    )


def exit_if_stopped(trainer, stop: StopOnSignal, command: list[str]) -> None:
    """After trainer.train(): exit at a nan/inf loss (one line, code 1; nothing of that step was saved, so the last
    checkpoint is good), or after Ctrl-C/SIGTERM (code 128 + the signal) with the command that resumes."""
    import shlex

    from cli_utils import fail
    from model_utils import is_main_process

    if trainer.nonfinite_loss.step is not None:
        if is_main_process():
            fail(nonfinite_loss_message(trainer.args, trainer.nonfinite_loss.step), code=1)
        raise SystemExit(1)
    if stop.signal_name:
        command = [arg for arg in command if arg not in ("--overwrite", "--resume")] + ["--resume"]
        logger.log(
            logging.WARNING if is_main_process() else logging.DEBUG,  # one message for all processes
            "Stopped by %s at step %d; the checkpoint is saved in %s. Continue with:\n  python %s",
            stop.signal_name,
            trainer.state.global_step,
            trainer.args.output_dir,
            shlex.join(command),
        )
        raise SystemExit(128 + signal.Signals[stop.signal_name])

"""The trainer of a run: TRL's SFTTrainer, DPOTrainer or ORPOTrainer on the prepared 4-bit base, with the checks
that must pass before it trains, and the global batch it trains on.

The packing story, told once: with --packing (the default) TRL packs whole conversations best-fit-decreasing into rows
of --max_length tokens and runs each micro-batch padding-free (one row, no pad tokens). Positions restart at every
conversation, and transformers builds a block-diagonal mask from them (sdpa, eager, flex) or cuts the flash-attention
kernel at the restarts, so conversations never attend to each other. That holds only for attention that reads the
position ids: before training, `packed_examples_stay_apart` measures it on the model, and where it fails training falls
back to length-grouped batches with a warning. The original recipe padded every batch to its longest example.
"""

import copy
import gc
import logging
from dataclasses import fields

import torch
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer, SFTTrainer

from adapter_utils import check_lora_targets, load_trainable_adapter
from quantization_utils import fsdp_enabled, keep_norms_in_float32, keep_trainable_weights_in_float32
from train_callbacks import StopOnNonFiniteLoss
from workarounds import (
    RestoreTrainableDtypesOnResume,
    TemplateTokensInOrpo,
    attention_builds_packing_masks,
    attention_implementation,
    keep_4bit_weights_trainable_on_cpu,
)

logger = logging.getLogger(__name__)


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's trainer for --method: SFTTrainer (it tokenizes with the chat template, masks everything but assistant
    turns and their EOS from the loss, packs the conversations unless the model's attention would mix them),
    DPOTrainer or ORPOTrainer (prompt/chosen/rejected pairs in the same template). Each wraps the model in the LoRA
    adapter (or continues --init_adapter) and runs the loop; its training steps report their loss to a
    `StopOnNonFiniteLoss` callback."""
    if peft_config is not None and not training_args.init_adapter:
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
    if training_args.method == "sft":
        trainer_args = copy.copy(training_args)
        trainer_args.push_to_hub = False
        return SFTTrainer, trainer_args
    shared = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
    shared |= {"push_to_hub": False, "max_length": training_args.max_length, "beta": training_args.beta}
    if training_args.method == "dpo":
        return DPOTrainer, DPOConfig(**shared)
    # Imported here, for ORPO runs only: TRL 1.16 keeps ORPO under trl.experimental, whose API may change between
    # releases, and which warns about that when imported.
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return type("ORPOTrainer", (TemplateTokensInOrpo, ORPOTrainer), {}), ORPOConfig(**shared)


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


def global_batch(micro_batch: int, accumulation: int, processes: int, total: int, pairs: bool, packing, max_length):
    """The examples one optimizer step trains on, in the words of the training log and the model card: 'micro-batch 4
    x accumulation 2 x 2 processes = 16 packed rows of up to 512 tokens' (the process count where there are several;
    preference pairs for DPO and ORPO, examples when unpacked)."""
    text = f"micro-batch {micro_batch} x accumulation {accumulation}"
    if processes > 1:
        text += f" x {processes} processes"
    if pairs:
        unit = "preference pairs"  # packing is SFT's alone
    elif packing:
        unit = f"packed rows of up to {max_length} tokens"
    else:
        unit = "examples"
    return f"{text} = {total} {unit}"


def global_batch_message(trainer) -> str:
    """The trainer's global batch per optimizer step, in its own numbers, and what to do when one process sees
    several GPUs."""
    args = trainer.args
    message = global_batch(
        args.train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
        trainer.get_total_train_batch_size(args),
        pairs=not isinstance(trainer, SFTTrainer),
        packing=getattr(args, "packing", False),
        max_length=args.max_length,
    )
    message += " per optimizer step"
    if args.n_gpu > 1:  # one process that sees several GPUs: a 4-bit model stays on the first, with their batches
        message += (
            f". One process sees {args.n_gpu} GPUs but trains on the first only, with a {args.n_gpu}x micro-batch: "
            f"launch with `torchrun --nproc_per_node {args.n_gpu} train.py ...` to use them all."
        )
    return message

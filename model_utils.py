"""Load the tokenizer and model, build the trainer, find checkpoints and adapters, generate replies.

Written once and imported by train.py, inference.py and app.py, so all three load and prompt the same way.
"""

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)

from config import GenerationArguments, ModelArguments, QuantizationArguments
from data_utils import CHAT_TEMPLATE
from quantization_utils import build_bnb_config, compute_dtype, fsdp_enabled, quant_storage_dtype

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "run_config.yaml"  # written last by train.py: its presence means the run finished
# What `--resume` needs from a checkpoint, in the order the Trainer writes them (Trainer._save_checkpoint): the
# adapter, the optimizer and scheduler, the RNG state (rng_state.pth, or rng_state_<rank>.pth per process), and
# trainer_state.json last. The Trainer writes in place (no temporary folder), so a kill mid-save leaves a folder
# with only the first few: a checkpoint counts only when all are there and trainer_state.json parses.
RESUME_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json")


class ModelError(ValueError):
    """A model, adapter or checkpoint that cannot be used; the message says what to do."""


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with our conversation template installed as its chat_template."""
    check_model_source(name_or_path, "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(unreachable_model_message(name_or_path, e)) from None
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer of {name_or_path} has no EOS token; the template needs one to end replies.")
    if tokenizer.pad_token is None:
        # Phi-2 has no pad token. Reusing EOS is safe here: TRL's collator builds labels from each example's own
        # length, not by comparing ids with the pad id, so the EOS that ends a reply is still trained.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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
    """A local model or tokenizer must be a folder saved with save_pretrained; anything else is taken for a Hub id."""
    path = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not path.exists():
        raise ModelError(f"no model folder at {name_or_path}: pass a folder saved with save_pretrained, or a Hub id.")
    if path.exists() and not (path / required_file).is_file():
        raise ModelError(f"{name_or_path} is not a model folder (it has no {required_file}).")


def unreachable_model_message(name_or_path: str, error: Exception) -> str:
    if looks_like_path(name_or_path):
        return f"cannot load a model from {name_or_path}: {str(error).splitlines()[0]}"
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
    """bitsandbytes needs the whole model on one device; under torchrun each process takes its own GPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


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
    attn_implementation = model_args.attn_implementation
    if attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        logger.warning("--attn_implementation flash_attention_2 needs a CUDA GPU: using sdpa on CPU.")
        attn_implementation = "sdpa"
    check_model_source(model_args.model_name_or_path)
    folder = Path(model_args.model_name_or_path).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelError(
            f"{folder} holds only pickled weights (*.bin), which are never loaded (unpickling can run code): convert "
            "them to safetensors once, where you trust them (from_pretrained, then save_pretrained)."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            quantization_config=build_bnb_config(quant_args),
            dtype=compute_dtype(quant_args),
            attn_implementation=attn_implementation,
            device_map=device_map(),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # pickled .bin weights can run code when loaded
        )
    except OSError as e:
        raise ModelError(unreachable_model_message(model_args.model_name_or_path, e)) from None
    except ImportError as e:  # flash-attn not installed, a kernel package missing
        raise ModelError(f"{str(e).splitlines()[0]} (or use --attn_implementation sdpa)") from None
    return model


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first time
    the layer runs without gradients (an evaluation, a generate). That layout has no backward pass to the layer's
    input, so every later training step silently gets wrong gradients for the LoRA weights below it (measured:
    a different loss and gradients off by 0.3 on a norm of 2.6). Training must never see it: keep the layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def packed_examples_stay_apart(model) -> bool:
    """Whether this model, with its attention implementation, keeps examples packed into one row apart.

    Padding-free packing gives the model one row and position ids that restart at every example, and no attention
    mask. transformers turns such position ids into a block-diagonal mask (sdpa, eager, flex) or cuts the flash
    attention kernel at the restarts; an attention function that ignores them (a custom kernel, remote code) lets
    every example see the ones before it. Measured, not assumed: run two examples packed in one row, change the
    first one's tokens, and check that the second one's logits stay the same."""
    if any(p.device.type == "meta" for p in model.parameters()):
        # FSDP's memory-efficient loading leaves the weights on the meta device in all but the first process: judge by
        # the attention implementation, as transformers does (it builds masks only for those it knows).
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return model.config._attn_implementation in ALL_MASK_ATTENTION_FUNCTIONS
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
    # Kept apart, the second example's logits come out of the same kernels on the same inputs: equal (measured: 0.0
    # with sdpa and eager, float32 and bf16). Mixed, they move by a large share of their scale (0.44 on the tiny test
    # model). 1e-2 leaves room for a few bf16 roundings in kernels that are not bitwise deterministic.
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
        model.config._attn_implementation,
        training_args.per_device_train_batch_size,
    )
    training_args.packing = training_args.padding_free = training_args.eval_packing = False
    training_args.train_sampling_strategy = "group_by_length"


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's SFTTrainer: it tokenizes with the chat template, masks everything but assistant turns (and their EOS)
    from the loss, packs the conversations (unless the model's attention would mix them), wraps the model in the
    LoRA adapter and runs the loop."""
    from peft import prepare_model_for_kbit_training
    from trl import SFTTrainer

    class QLoRATrainer(SFTTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # For a 4-bit base TRL trains the LoRA weights in bf16 (QLoRA paper), but on --resume the Trainer loads
            # the adapter with peft's load_adapter, which upcasts it to float32 (autocast_adapter_dtype=True): the
            # resumed run would continue in another precision than the run it continues (measured: final adapters
            # 5.6e-4 apart after 3 steps). Put every trainable weight back in its dtype before the optimizer is
            # built; resumed and uninterrupted runs are then identical (tests/test_resume.py).
            dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in self.model.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

    quantized = getattr(model, "is_loaded_in_4bit", False)
    if quantized:
        keep_4bit_weights_trainable_on_cpu(model)  # before the packing check below runs the model without gradients
    fall_back_to_length_grouping_if_packing_leaks(model, training_args)
    if quantized and not fsdp_enabled():
        # Norms and embeddings to float32 for stable training; TRL then makes the LoRA weights bf16 as in the paper.
        # Not under FSDP: it flattens each decoder layer into one tensor of one dtype, the 4-bit storage dtype.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return QLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def global_batch_message(trainer) -> str:
    """Processes x micro-batch x accumulation = examples (packed rows when packing) per optimizer step, in the
    Trainer's own numbers."""
    args = trainer.args
    processes = f"{args.world_size} process" + ("es" if args.world_size > 1 else "")
    unit = f"packed rows of up to {args.max_length} tokens" if args.packing else "examples"
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
    previous = {signum: signal.signal(signum, callback.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield callback
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(callback)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and adapters


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_complete_checkpoint(path: Path) -> bool:
    """Every file --resume needs is there, and trainer_state.json (written last) is whole and names this step."""
    if not all(any(path.glob(pattern)) for pattern in RESUME_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(path)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in output_dir, or None; incomplete ones are skipped, never loaded."""
    latest = None
    for checkpoint in checkpoints(output_dir):
        if is_complete_checkpoint(checkpoint):
            latest = checkpoint
        else:
            logger.warning("Skipping %s: it is incomplete (a save was interrupted).", checkpoint)
    return latest


def remove_incomplete_checkpoints(output_dir: str | Path, resume_from: Path | None = None) -> None:
    """Before training: delete the partial saves after the checkpoint we resume from (all of them on a fresh start).
    The Trainer writes the same folder names again, in place, and a stale file from an interrupted save must not end
    up in a new checkpoint."""
    after = checkpoint_step(resume_from) if resume_from else -1
    for checkpoint in checkpoints(output_dir):
        if checkpoint_step(checkpoint) > after and not is_complete_checkpoint(checkpoint):
            logger.warning("Removing %s: a save that was interrupted.", checkpoint)
            shutil.rmtree(checkpoint)


def is_finished_run(output_dir: str | Path) -> bool:
    """A final adapter or the run_config.yaml that train.py writes when a run ends."""
    folder = Path(output_dir)
    return (folder / RUN_CONFIG).is_file() or (folder / ADAPTER_CONFIG).is_file()


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path | None:
    """What a run may do with its output folder; returns the checkpoint to resume from. A finished run is never
    trained over without --overwrite; a folder with only checkpoints is an unfinished run: --resume continues it."""
    if resume and overwrite:
        raise ModelError(f"--resume continues the run in {output_dir} and --overwrite replaces it: pass only one.")
    check_writable(output_dir)
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise ModelError(f"--resume: no complete checkpoint in {output_dir}; run without --resume to start.")
        return checkpoint
    if overwrite:
        return None
    if is_finished_run(output_dir):
        raise ModelError(
            f"{output_dir} holds a finished run: pass --overwrite to replace it, --resume with a larger --max_steps "
            "to extend it, or choose another --output_dir."
        )
    previous = [checkpoint for checkpoint in checkpoints(output_dir) if is_complete_checkpoint(checkpoint)]
    if previous:
        raise ModelError(
            f"{output_dir} holds the checkpoints of an unfinished run (up to {previous[-1].name}): continue it with "
            "--resume, or pass --overwrite to start over."
        )
    return None


def remove_previous_run(output_dir: str | Path) -> None:
    """--overwrite: delete what would make the old run look like part of the new one (its checkpoints, which
    --resume would pick, and its final adapter and run config); the new run's files replace the rest."""
    folder = Path(output_dir)
    removed = [str(checkpoint) for checkpoint in checkpoints(folder)]
    for checkpoint in checkpoints(folder):
        shutil.rmtree(checkpoint)
    for name in (RUN_CONFIG, ADAPTER_CONFIG, ADAPTER_FILE):
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(str(folder / name))
    if removed:
        logger.warning("--overwrite: removed the previous run's %s.", ", ".join(removed))


def check_writable(output_dir: str | Path) -> None:
    """Fail before hours of training, not at the first checkpoint; creates nothing (a probe file is removed)."""
    folder = Path(output_dir).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ModelError(f"cannot write to {output_dir}: {existing} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ModelError(f"cannot write to {output_dir}: {e.strerror} ({existing}).") from None


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
):
    """Base model (+ LoRA adapter unless `adapter` is None) and the tokenizer, ready for generation."""
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
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Generation


def reply_streamer(tokenizer, **kwargs):
    """A TextStreamer that prints only the reply, without the space the template puts after '### Assistant:'."""
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> torch.Tensor:
    """The conversation so far, ending with '### Assistant:', as the model saw it in training."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@torch.inference_mode()
def generate_reply(
    model, tokenizer, messages: list[dict], gen_args: GenerationArguments, streamer=None, stopping_criteria=None
) -> str:
    """The assistant's next reply: generation stops at EOS, and the reply is cut from the output by token position."""
    if gen_args.seed is not None:
        torch.manual_seed(gen_args.seed)
    inputs = prompt_ids(tokenizer, messages).to(model.device)
    output = model.generate(
        **inputs,
        **gen_args.generate_kwargs(),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        stopping_criteria=stopping_criteria,
    )
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@torch.inference_mode()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    gen_args: GenerationArguments,
    batch_size: int = 8,
    adapter_names: list[str] | None = None,
) -> list[dict]:
    """The next reply to each conversation, in order, generated in batches with left padding (so that every row's
    new tokens start at the same position): [{"reply": text, "stopped": ended with EOS within the budget}].
    `adapter_names` (PEFT models): the adapter for each conversation's row, "__base__" for none."""
    if gen_args.seed is not None:
        torch.manual_seed(gen_args.seed)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in tqdm(
            range(0, len(conversations), batch_size), desc="Generating", unit="batch", disable=len(conversations) <= 1
        ):
            batch = tokenizer.apply_chat_template(
                conversations[start : start + batch_size],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            per_row = {} if adapter_names is None else {"adapter_names": adapter_names[start : start + batch_size]}
            output = model.generate(
                **batch,
                **gen_args.generate_kwargs(),
                **per_row,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                # Rows that stop early are padded after their EOS: the reply is everything before the first EOS.
                stopped = tokenizer.eos_token_id in row
                reply_ids = row[: row.index(tokenizer.eos_token_id)] if stopped else row
                results.append(
                    {"reply": tokenizer.decode(reply_ids, skip_special_tokens=True).strip(), "stopped": stopped}
                )
    finally:
        tokenizer.padding_side = padding_side
    return results


class StopOnEvent:
    """A stopping criterion that ends generation when `event` is set (the page's stop button, a closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, messages: list[dict], gen_args: GenerationArguments, timeout: float = 120.0):
    """Yield the reply as it grows (the whole text so far each time), generating in a background thread.

    The streamer waits at most `timeout` seconds for each piece, so a generation that dies or stalls raises instead
    of hanging its caller; an error in the generation thread is raised here. Closing this generator (a page's stop
    button) stops the generation at the next token, so the model is free again at once."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    stop = threading.Event()
    failure: list[BaseException] = []
    final: list[str] = []

    def generate():
        try:
            stopping = StoppingCriteriaList([StopOnEvent(stop)])
            final.append(generate_reply(model, tokenizer, messages, gen_args, streamer, stopping))
        except BaseException as e:  # handed to the consumer, which re-raises it
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = shown = ""
    try:
        for piece in streamer:
            text += piece
            if text.strip() != shown:
                shown = text.strip()
                yield shown
    except queue.Empty:
        raise TimeoutError(f"generation produced nothing for {timeout:.0f} s; it was stopped.") from None
    finally:
        stop.set()
        # The model is not free until the thread is done with it (the caller may switch the adapter next).
        thread.join(timeout)
    if failure:
        raise failure[0]
    # The streamer decodes piece by piece and can differ in whitespace (it restarts after a newline); the last
    # update is the reply decoded whole, as generate_reply returns it.
    if final and final[0] != shown:
        yield final[0]


def history_that_fits(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (a user turn and its reply) until the prompt fits in `max_tokens`.

    Returns the kept messages and how many exchanges were dropped. The newest user message is always kept: when it
    alone is too long, the caller must refuse it (see `prompt_length`)."""
    dropped = 0
    while len(messages) > 1 and prompt_length(tokenizer, messages) > max_tokens:
        messages = messages[2:] if messages[0]["role"] == "user" and len(messages) > 2 else messages[1:]
        dropped += 1
    return messages, dropped


def prompt_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def context_length(model) -> int:
    """How many tokens (prompt and reply) the model can attend to."""
    return model.config.max_position_embeddings


# ---------------------------------------------------------------------------------------------------------------
# A standalone model


def merge_adapter(adapter: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "bfloat16") -> Path:
    """Write base + adapter as one plain model (merged weights, safetensors) with the tokenizer and chat template.

    The base is loaded unquantized in `dtype`: LoRA's update cannot be folded exactly into 4-bit weights, so the
    merged model is the 16-bit base plus the adapter (what the adapter computes on a 16-bit base)."""
    model, tokenizer = load_chat_model(
        adapter, base, QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype=dtype)
    )
    merged = model.merge_and_unload()
    # generate() on the merged folder stops at the template's end of turn, and batches pad with the same id.
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, max_shard_size="5GB")  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir

"""Load the tokenizer and model, build the trainer, find checkpoints and adapters, generate replies.

Written once and imported by train.py, inference.py and app.py, so all three load and prompt the same way.
"""

import logging
import os
import queue
import re
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from config import GenerationArguments, ModelArguments, QuantizationArguments
from data_utils import CHAT_TEMPLATE
from quantization_utils import build_bnb_config, compute_dtype, fsdp_enabled, quant_storage_dtype

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


class ModelError(ValueError):
    """A model, adapter or checkpoint that cannot be used; the message says what to do."""


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with our conversation template installed as its chat_template."""
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


def unreachable_model_message(name_or_path: str, error: Exception) -> str:
    if Path(name_or_path).exists() or "/" not in name_or_path or name_or_path.startswith((".", "/")):
        return f"cannot load a model from {name_or_path}: {str(error).splitlines()[0]}"
    return (
        f"cannot download {name_or_path} from the Hugging Face Hub (no network?). Download it where there is one "
        f"(huggingface-cli download {name_or_path} --local-dir DIR) and pass --model DIR."
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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            quantization_config=build_bnb_config(quant_args),
            dtype=compute_dtype(quant_args),
            attn_implementation=model_args.attn_implementation,
            device_map=device_map(),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # pickled .bin weights can run code when loaded
        )
    except OSError as e:
        raise ModelError(unreachable_model_message(model_args.model_name_or_path, e)) from None
    return model


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first time
    the layer runs without gradients (an evaluation, a generate). That layout has no backward pass to the layer's
    input, so every later training step silently gets wrong gradients for the LoRA weights below it (measured:
    a different loss and gradients off by 0.3 on a norm of 2.6). Training must never see it: keep the layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset=None, peft_config=None):
    """TRL's SFTTrainer: it tokenizes with the chat template, masks everything but assistant turns (and their EOS)
    from the loss, wraps the model in the LoRA adapter and runs the loop."""
    from peft import prepare_model_for_kbit_training
    from trl import SFTTrainer

    if getattr(model, "is_loaded_in_4bit", False):
        keep_4bit_weights_trainable_on_cpu(model)
    if getattr(model, "is_loaded_in_4bit", False) and not fsdp_enabled():
        # Norms and embeddings to float32 for stable training; TRL then makes the LoRA weights bf16 as in the paper.
        # Not under FSDP: it flattens each decoder layer into one tensor of one dtype, the 4-bit storage dtype.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def global_batch_message(trainer) -> str:
    """Processes x micro-batch x accumulation = examples per optimizer step, in the Trainer's own numbers."""
    args = trainer.args
    processes = f"{args.world_size} process" + ("es" if args.world_size > 1 else "")
    message = (
        f"{processes} x micro-batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps} = "
        f"global batch {trainer.get_total_train_batch_size(args)} examples per optimizer step"
    )
    if args.n_gpu > 1:  # one process that sees several GPUs: a 4-bit model stays on the first, with their batches
        message += (
            f". One process sees {args.n_gpu} GPUs but trains on the first only, with a {args.n_gpu}x micro-batch: "
            f"launch with `torchrun --nproc_per_node {args.n_gpu} train.py ...` to use them all."
        )
    return message


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and adapters


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json after the weights: without both, the save was cut short."""
    return (path / ADAPTER_FILE).is_file() and (path / "trainer_state.json").is_file()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in output_dir, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    checkpoints = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0]
    complete = [p for p in checkpoints if is_complete_checkpoint(p)]
    for skipped in set(checkpoints) - set(complete):
        logger.warning("Skipping %s: it is incomplete (a save was interrupted).", skipped)
    return max(complete, key=checkpoint_step, default=None)


def find_adapter(path: str | Path) -> Path:
    """The final adapter in `path`, else its latest checkpoint."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        logger.info("No final adapter in %s: using %s.", folder, checkpoint)
        return checkpoint
    if not folder.exists():
        raise ModelError(f"no adapter at {folder}: train one with `python train.py`, or pass --adapter DIR.")
    raise ModelError(f"{folder} holds no LoRA adapter (adapter_config.json) and no checkpoint.")


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
        base = base or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
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
    model, tokenizer, conversations: list[list[dict]], gen_args: GenerationArguments, batch_size: int = 8
) -> list[dict]:
    """The next reply to each conversation, in order, generated in batches with left padding (so that every row's
    new tokens start at the same position): [{"reply": text, "stopped": ended with EOS within the budget}]."""
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
            output = model.generate(
                **batch,
                **gen_args.generate_kwargs(),
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

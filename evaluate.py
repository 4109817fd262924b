"""What did the fine-tune change? Base vs tuned on held-out conversations, with a model card.

    python evaluate.py --model_dir model          # also runs at the end of train.py (--final_report)

Reads the run's settings from model_dir/run_config.yaml, rebuilds the same held-out conversations (oasst1's
validation split, or the trees held out with --eval_fraction), loads the base once and switches the adapter off for
the base figures, then writes to model_dir:
- eval.json: held-out loss and perplexity on assistant tokens, and the clean-stop rate (replies to held-out prompts,
  greedy, that end with EOS within the budget and invent no "### Human:" turn), for base and tuned;
- loss.png: training and held-out loss against step;
- README.md: a model card with the data, settings, hardware, time and the figures above.
"""

import contextlib
import json
import logging
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import GenerationArguments, ReportArguments, fail
from data_utils import HUMAN, Conversations

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    model_dir: str = field(default="model", metadata={"help": "A training output folder (with run_config.yaml)."})


# ---------------------------------------------------------------------------------------------------------------
# Figures


def loss_labels(tokenizer, messages: list[dict], loss_on: str, max_length: int | None) -> tuple[list[int], list[int]]:
    """Token ids and labels exactly as in training: -100 except on the assistant tokens (and EOS) that carry loss."""
    encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    if loss_on == "last":  # only the final reply: everything up to its "### Assistant:" is context
        start = len(
            tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        mask = [0] * start + mask[start:]
    ids, mask = ids[:max_length], mask[:max_length]
    return ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]


@torch.inference_mode()
def assistant_token_loss(model, tokenizer, conversations: Conversations, max_length: int | None, batch_size: int = 4):
    """Mean negative log-likelihood per assistant token over all held-out conversations, and the token count."""
    rows = [loss_labels(tokenizer, e["messages"], conversations.loss_on, max_length) for e in conversations.examples]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
        shifted = labels[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += int((shifted != -100).sum())
    return total / max(count, 1), count


def generate_replies(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    batch_size: int = 32,
    adapter_names: list[str] | None = None,
):
    """Greedy replies to each prompt, batched with left padding: [{"reply", "stopped", "clean"}]."""
    from model_utils import generate_replies as batched_replies

    greedy = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=repetition_penalty)
    results = batched_replies(model, tokenizer, prompts, greedy, batch_size, adapter_names)
    return [{**r, "clean": r["stopped"] and HUMAN not in r["reply"]} for r in results]


def figures(model, tokenizer, held_out: Conversations, report_args, max_length: int | None) -> dict:
    """Loss, perplexity and clean-stop rate, with the adapter off (base) and on (tuned)."""
    # Each held-out conversation's opening question (once per question: the replies policy repeats them).
    openings = {e["messages"][0]["content"]: e["messages"][:1] for e in held_out.examples}
    prompts = list(openings.values())[: report_args.report_prompts]
    result = {}
    for name in ("base", "tuned"):
        logger.info("Held-out loss of the %s model on %d conversations...", name, len(held_out.examples))
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            loss, tokens = assistant_token_loss(model, tokenizer, held_out, max_length)
        result[name] = {"heldout_loss": loss, "heldout_perplexity": math.exp(loss)}
    # Base and tuned replies in one batch: PEFT runs the rows named "__base__" without the adapter. One generate call
    # instead of two (measured on CPU: a quarter less time), and both sides get the same prompts and padding.
    logger.info("Base and tuned replies to %d held-out prompts...", len(prompts))
    replies = generate_replies(
        model,
        tokenizer,
        prompts + prompts,
        report_args.report_max_new_tokens,
        report_args.report_repetition_penalty,
        adapter_names=["__base__"] * len(prompts) + [model.active_adapter] * len(prompts),
    )
    for name, side in (("base", replies[: len(prompts)]), ("tuned", replies[len(prompts) :])):
        result[name]["clean_stop_rate"] = sum(r["clean"] for r in side) / max(len(side), 1)
        result[name]["replies"] = side
    result["assistant_tokens"] = tokens
    result["loss_ratio"] = result["tuned"]["heldout_loss"] / result["base"]["heldout_loss"]
    result["prompts"] = [p[0]["content"] for p in prompts]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report files


def plot_losses(log_history: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    held_out = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not held_out:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "training loss", "-"), (held_out, "held-out loss", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def model_card(run: dict, data: dict, train_metrics: dict, report: dict, has_plot: bool) -> str:
    base, tuned = report["base"], report["tuned"]
    rows = "\n".join(
        f"| {label} | {base[key]:{fmt}} | {tuned[key]:{fmt}} |"
        for label, key, fmt in (
            ("Held-out loss (assistant tokens)", "heldout_loss", ".4f"),
            ("Held-out perplexity", "heldout_perplexity", ".2f"),
            ("Clean-stop rate", "clean_stop_rate", ".0%"),
        )
    )
    examples = "\n\n".join(
        f"**Prompt:** {prompt}\n\n- *Base:* {b['reply'][:600]!s}\n- *Tuned:* {t['reply'][:600]!s}"
        for prompt, b, t in list(zip(report["prompts"], base["replies"], tuned["replies"], strict=True))[
            : run.get("report_examples", 3)
        ]
    )
    filters = data.get("filters", {})
    return f"""---
base_model: {run["model_name_or_path"]}
library_name: peft
license: apache-2.0
tags: [qlora, lora, oasst1, trl, sft]
---

# {Path(run["output_dir"]).name}: a QLoRA adapter for {run["model_name_or_path"]}

A LoRA adapter trained with 4-bit ({run["bnb_4bit_quant_type"]}) QLoRA on OpenAssistant conversations, in the
`### Human: ... ### Assistant: ...` format (saved as the tokenizer's chat template).

## Data
- Source: `{run["dataset"]}`; policy `{run["policy"]}`; languages: {run["langs"] or "all"}.
- Examples: {data["train_examples"]} for training, {data["heldout_examples"]} held out ({report["assistant_tokens"]}
  assistant tokens).
- Filters (messages removed): deleted {filters.get("deleted", 0)}, rejected in review {filters.get("rejected", 0)},
  other languages {filters.get("other_language", 0)}, orphaned {filters.get("orphaned", 0)}; kept
  {filters.get("kept", "n/a")} of {filters.get("messages", "n/a")}.

## Training
- LoRA r {run["lora_r"]}, alpha {run["lora_alpha"]}, dropout {run["lora_dropout"]}, targets
  `{run["lora_target_modules"]}`; double quantization {run["bnb_4bit_use_double_quant"]}.
- {run["max_steps"]} steps of {global_batch(run, train_metrics)}, {run["max_length"]} tokens, learning rate
  {run["learning_rate"]} ({run["lr_scheduler_type"]}, warmup {run["warmup_steps"]}), optimizer {run["optim"]}, max grad
  norm {run["max_grad_norm"]}, seed {run["seed"]}.
- Hardware: {train_metrics.get("hardware", "n/a")}; training time {train_metrics.get("train_runtime", 0):.0f} s;
  final training loss {train_metrics.get("train_loss", float("nan")):.4f}.

## Evaluation (held-out conversations, base vs tuned)

| | base | tuned |
|---|---|---|
{rows}

Tuned/base held-out loss: {report["loss_ratio"]:.3f}. Clean stop: greedy replies (repetition penalty
{run.get("report_repetition_penalty", 1.0)}) to {len(report["prompts"])} held-out prompts, within
{run.get("report_max_new_tokens", "n/a")} new tokens, that end with EOS and invent no "### Human:" turn.
{"" if not has_plot else chr(10) + "![training and held-out loss](loss.png)" + chr(10)}
## Examples

{examples}

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{run["output_dir"]}")
tokenizer = AutoTokenizer.from_pretrained("{run["output_dir"]}")
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0][inputs["input_ids"].shape[1]:],
                       skip_special_tokens=True))
```

or `python inference.py "Hello!" --adapter {run["output_dir"]}`.
"""


def global_batch(run: dict, train_metrics: dict) -> str:
    """'micro-batch 4 x accumulation 2 = 8 packed rows of up to 512 tokens' (or N examples unpacked), with the process
    count when there were several."""
    processes = train_metrics.get("processes", 1)
    text = f"micro-batch {run['per_device_train_batch_size']} x accumulation {run['gradient_accumulation_steps']}"
    if processes > 1:
        text += f" x {processes} processes"
    total = train_metrics.get(
        "global_batch_size", run["per_device_train_batch_size"] * run["gradient_accumulation_steps"] * processes
    )
    return f"{text} = {total} " + (
        f"packed rows of up to {run['max_length']} tokens" if run.get("packing") else "examples"
    )


def describe_hardware(processes: int = 1) -> str:
    """The device this process runs on; with several processes (torchrun, accelerate), how many."""
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        return gpu if processes == 1 else f"{processes} x {gpu}"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return cpu if processes == 1 else f"{processes} processes on {cpu}"


def main(args: list[str] | None = None) -> dict | None:
    from transformers import HfArgumentParser

    from config import parse_train_args
    from data_utils import DataError, drop_long_examples, load_train_and_eval
    from model_utils import ModelError, is_main_process, load_chat_model

    parser = HfArgumentParser(EvaluateArguments)
    parser.description = __doc__
    parser.epilog = (
        "The report settings of the run (--report_prompts, --report_max_new_tokens, ...) can be overridden."
    )
    try:
        eval_args, overrides = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    except ValueError as e:
        fail(str(e))
    if not is_main_process():  # under torchrun/accelerate launch: one process evaluates and writes the report
        return None
    folder = Path(eval_args.model_dir)
    run_config = folder / "run_config.yaml"
    if not run_config.is_file():
        fail(f"{run_config} not found: point --model_dir at a training output folder.")
    report_flags = {f"--{name}" for name in ReportArguments.__dataclass_fields__}
    for flag in overrides:
        if flag.startswith("--") and flag.split("=")[0] not in report_flags:
            fail(f"{flag}: evaluate.py takes --model_dir and the report settings ({', '.join(sorted(report_flags))}).")
    model_args, quant_args, _, data_args, report_args, training_args = parse_train_args(
        ["--config", str(run_config), *overrides]
    )
    try:
        train_data, held_out = load_train_and_eval(data_args)
    except DataError as e:
        fail(str(e))
    if held_out is None or not held_out.examples:
        fail("no held-out data in this run: train with --eval_fraction, --eval_dataset or the Hub's --eval_split.")
    try:
        model, tokenizer = load_chat_model(
            folder, model_args.model_name_or_path, quant_args, model_args.attn_implementation
        )
    except ModelError as e:
        fail(str(e))
    if data_args.long_examples == "drop":  # the same held-out set the trainer evaluated on
        train_data = drop_long_examples(train_data, tokenizer, training_args.max_length)
        held_out = drop_long_examples(held_out, tokenizer, training_args.max_length)

    report = figures(model, tokenizer, held_out, report_args, training_args.max_length)
    state_file = folder / "trainer_state.json"
    log_history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    train_metrics_file = folder / "train_results.json"
    train_metrics = json.loads(train_metrics_file.read_text()) if train_metrics_file.is_file() else {}
    data = {
        "train_examples": len(train_data.examples),
        "heldout_examples": len(held_out.examples),
        "filters": dict(train_data.counts),
    }
    has_plot = plot_losses(log_history, folder / "loss.png")
    (folder / "eval.json").write_text(json.dumps({**report, "data": data, "training": train_metrics}, indent=2))
    run = {**vars(model_args), **vars(quant_args), **vars(data_args), **vars(report_args)}
    run.update(
        {
            k: getattr(training_args, k)
            for k in (
                "output_dir",
                "max_steps",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_length",
                "packing",
                "learning_rate",
                "warmup_steps",
                "optim",
                "max_grad_norm",
                "seed",
            )
        }
    )
    for enum_setting in ("lr_scheduler_type", "optim"):  # the Trainer turns these into enums
        value = getattr(training_args, enum_setting)
        run[enum_setting] = str(getattr(value, "value", value))
    run["lora_r"], run["lora_alpha"], run["lora_dropout"], run["lora_target_modules"] = _lora_settings(folder)
    (folder / "README.md").write_text(model_card(run, data, train_metrics, report, has_plot))
    print(
        f"held-out loss (assistant tokens): base {report['base']['heldout_loss']:.4f}, "
        f"tuned {report['tuned']['heldout_loss']:.4f} (x{report['loss_ratio']:.3f}); clean-stop rate: "
        f"base {report['base']['clean_stop_rate']:.0%}, tuned {report['tuned']['clean_stop_rate']:.0%}; "
        f"wrote {folder / 'eval.json'}, {folder / 'README.md'}" + (f", {folder / 'loss.png'}" if has_plot else "")
    )
    return report


def _lora_settings(folder: Path):
    """The adapter's own record of its LoRA settings (what was trained, whatever the config file said)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = config["target_modules"]
    return (
        config["r"],
        config["lora_alpha"],
        config["lora_dropout"],
        (",".join(sorted(targets)) if isinstance(targets, list) else targets),
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()

"""What did the fine-tune change? Base vs tuned on held-out conversations, with a model card.

    python report.py --model_dir model          # also runs at the end of train.py (--final_report)
    python report.py --model_dir model --report_prompts 20 --report_repetition_penalty 1.0

Reads the run's settings from model_dir/run_config.yaml, rebuilds the same held-out conversations that training
evaluated on (training_examples.prepare_examples), loads the base once and switches the adapter off for the base
figures, then writes to model_dir:
- eval.json: held-out loss and perplexity on assistant tokens, and the clean-stop rate (greedy replies to held-out
  prompts that end with EOS within the budget and invent no "### Human:" turn), for base and tuned;
- loss.png: training and held-out loss against step;
- README.md: a model card (huggingface_hub's ModelCard) with the data, settings, hardware, time and the figures above.
"""

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from chat_template import HUMAN, first_turn
from cli_utils import argument_parser, fail, quiet_known_noise
from config import (
    DataArguments,
    GenerationArguments,
    ModelArguments,
    QuantizationArguments,
    ReportArguments,
    UserError,
)
from data_utils import HUB_DATASET, Conversations, DataError
from trainer_setup import global_batch

logger = logging.getLogger(__name__)


# The report's batches are bounded in memory, not rows, so that they fit a 15 GB T4 next to Phi-2 (README, "GPUs
# and precision", has the arithmetic): a generate call holds the KV cache of every prompt and reply token in it (5 GiB:
# 16,384 tokens of Phi-2 in fp16, all of a small model's rows at once), a loss forward the logits (a vocabulary's
# worth of them) of every token in it, and no KV cache (use_cache=False: Phi-2's config turns it on, and a 2,048-token
# batch's cache would be 0.6 GiB in fp16 that nothing reads).
GENERATION_KV_CACHE_BYTES = 5 * 2**30
LOSS_BATCH_TOKENS = 2048
REPORT_PAIR_POLICY = "best_vs_rest"


@dataclass
class ReportFolderArguments:
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


def padded_batches(model, tokenizer, rows: list[tuple[list[int], list[int]]], batch_tokens: int):
    """(input_ids, attention_mask, labels) batches of (ids, labels) rows, right-padded, on the model's device, each of
    at most `batch_tokens` tokens (one row at least)."""
    batch_size = max(1, batch_tokens // max(len(ids) for ids, _ in rows))
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        yield input_ids.to(model.device), attention.to(model.device), labels.to(model.device)


def scored_token_limit(model, max_length: int | None) -> int:
    """Held-out text is cut at max_length (as in training) and at the model's context."""
    from model_utils import context_length

    return min(max_length or context_length(model), context_length(model))


@torch.inference_mode()
def assistant_token_loss(
    model, tokenizer, conversations: Conversations, max_length: int | None, batch_tokens: int = LOSS_BATCH_TOKENS
):
    """Mean negative log-likelihood per assistant token over all held-out conversations, and the token count.
    Conversations are cut at max_length (as in training) and at the model's context; batches hold at most
    `batch_tokens` tokens (one row at least)."""
    limit = scored_token_limit(model, max_length)
    rows = [loss_labels(tokenizer, e["messages"], conversations.loss_on, limit) for e in conversations.examples]
    total, count = 0.0, 0
    for input_ids, attention, labels in padded_batches(model, tokenizer, rows, batch_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        shifted = labels[:, 1:]
        trained = shifted != -100  # float32 logits for these tokens only, not for every position of the batch
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][trained].float(), shifted[trained], reduction="sum")
        total += nll.item()
        count += int(trained.sum())
    return total / max(count, 1), count


@torch.inference_mode()
def reply_log_probs(
    model, tokenizer, pairs: Conversations, max_length: int | None, batch_tokens: int = LOSS_BATCH_TOKENS
) -> list[tuple[float, int, float, int]]:
    """For each preference pair: the summed log-probability of the chosen reply's tokens (and EOS) after the prompt,
    their count, and the same for the rejected reply; in the template as DPO and ORPO train on it, cut like the
    held-out loss."""
    limit = scored_token_limit(model, max_length)
    # Each distinct (prompt, reply) is scored once: best_vs_rest pairs a context's best reply with each other ranked
    # reply, so the chosen side repeats (the sample's 97 test pairs hold 142 distinct replies, not 194).
    rows, row_of_reply, sides_of_pairs = [], {}, []
    for pair in pairs.examples:
        start = len(
            tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(pair["prompt"] + pair[side], return_dict=True)["input_ids"][:limit]
            labels = [-100] * min(start, len(ids)) + ids[start:]
            if (key := (tuple(ids), tuple(labels))) not in row_of_reply:
                row_of_reply[key] = len(rows)
                rows.append((ids, labels))
            sides_of_pairs.append(row_of_reply[key])
    # Batched by length, so that a batch pads little; the results are put back in the rows' order below.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    rows = [rows[i] for i in order]
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    done = 0
    for input_ids, attention, labels in padded_batches(model, tokenizer, rows, batch_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        shifted = labels[:, 1:]
        trained = shifted != -100
        log_probs = -torch.nn.functional.cross_entropy(
            logits[:, :-1][trained].float(), shifted[trained], reduction="none"
        )
        row_of = trained.nonzero()[:, 0]
        batch_sums = torch.zeros(len(labels), device=log_probs.device).index_add_(0, row_of, log_probs).tolist()
        for i, total, count in zip(
            order[done : done + len(labels)], batch_sums, trained.sum(dim=1).tolist(), strict=True
        ):
            sums[i], counts[i] = total, count
        done += len(labels)
    chosen, rejected = sides_of_pairs[0::2], sides_of_pairs[1::2]
    return [(sums[c], counts[c], sums[r], counts[r]) for c, r in zip(chosen, rejected, strict=True)]


def pair_figures(scores: list[tuple[float, int, float, int]]) -> dict:
    """Preference accuracy: the share of pairs whose chosen reply gets the higher log-probability, summed over its
    tokens and per token, over the pairs where both replies have a token in the budget; ties count as misses."""
    scored = [s for s in scores if s[1] and s[3]]
    n = max(len(scored), 1)
    return {
        "preference_accuracy": sum(c > r for c, _, r, _ in scored) / n,
        "preference_accuracy_per_token": sum(c / nc > r / nr for c, nc, r, nr in scored) / n,
        "mean_margin": sum(c - r for c, _, r, _ in scored) / n,
        "pairs_scored": len(scored),
    }


def reward_accuracy(tuned: list[tuple], start: list[tuple]) -> float:
    """The share of pairs where training raised the chosen reply's log-probability more than the rejected one's,
    against the model the run started from: DPO's implicit reward (TRL logs it as rewards/accuracies), which a
    large gap in summed log-probability between two replies can hide from the preference accuracy. Over the pairs
    pair_figures scores; ties count as misses."""
    scored = [(t, s) for t, s in zip(tuned, start, strict=True) if t[1] and t[3]]
    return sum(t[0] - s[0] > t[2] - s[2] for t, s in scored) / max(len(scored), 1)


def preference_accuracy(model, tokenizer, pairs: Conversations, max_length: int | None) -> dict:
    """Preference accuracy on held-out pairs of every side (base, the start adapter, tuned), and the tuned model's
    reward accuracy against the side it started from (the start adapter, else the base)."""
    result, scores = {}, {}
    for name, adapter in sides(model).items():
        logger.info("Preference accuracy of the %s model on %d pairs...", name, len(pairs.examples))
        with running(model, adapter):
            scores[name] = reply_log_probs(model, tokenizer, pairs, max_length)
        result[name] = pair_figures(scores[name])
    start = "sft" if "sft" in scores else "base"
    result["tuned"]["reward_accuracy"] = reward_accuracy(scores["tuned"], scores[start])
    result["reward_against"] = start
    result["pairs"] = len(pairs.examples)
    return result


def kv_cache_bytes_per_token(model) -> int:
    """The KV cache one token takes: keys and values of every layer, in the dtype the model computes in."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.finfo(model.dtype).bits // 8


def generate_replies(model, tokenizer, prompts, max_new_tokens: int, repetition_penalty: float = 1.0, **per_row):
    """Greedy replies, batched (generation_utils.generate_replies) within GENERATION_KV_CACHE_BYTES of KV cache a
    batch, each marked clean when it stopped at EOS without inventing a "### Human:" turn. `per_row`:
    `adapter_names` for PEFT models, `repetition_penalties` in place of `repetition_penalty`."""
    from generation_utils import generate_replies as batched
    from generation_utils import prompt_length

    longest = max(prompt_length(tokenizer, p) for p in prompts) + max_new_tokens
    greedy = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=repetition_penalty)
    batch_size = max(1, GENERATION_KV_CACHE_BYTES // (longest * kv_cache_bytes_per_token(model)))
    # A reply that invents a "### Human:" turn is unclean whatever follows: its row stops there, not at the budget.
    results = batched(
        model, tokenizer, prompts, greedy, batch_size=batch_size, stop_strings=[HUMAN], count_tokens=True, **per_row
    )
    return [{**r, "clean": r["stopped"] and HUMAN not in r["reply"]} for r in results]


START_ADAPTER = "start"  # the adapter a DPO or ORPO run started from (--init_adapter), loaded beside the trained one


def sides(model) -> dict[str, str]:
    """The models the report compares, by the PEFT adapter each runs: base ("__base__": adapters off), the adapter
    the run started from when there is one ("sft"), and the trained adapter ("tuned")."""
    start = {"sft": START_ADAPTER} if START_ADAPTER in model.peft_config else {}
    return {"base": "__base__", **start, "tuned": "default"}


@contextlib.contextmanager
def running(model, adapter: str):
    """The model with only this adapter on ("__base__": none)."""
    if adapter == "__base__":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter("default")


def losses(model, tokenizer, held_out: Conversations, max_length: int | None) -> dict:
    """Held-out loss and perplexity of each side (base, the start adapter, tuned), and the assistant tokens scored."""
    result = {}
    for name, adapter in sides(model).items():
        logger.info("Held-out loss of the %s model on %d conversations...", name, len(held_out.examples))
        with running(model, adapter):
            loss, tokens = assistant_token_loss(model, tokenizer, held_out, max_length)
        result[name] = {"heldout_loss": loss, "heldout_perplexity": math.exp(loss)}
    result["assistant_tokens"] = tokens
    return result


def clean_stops(model, tokenizer, prompts: list, max_new_tokens: int, penalties: dict[str, float]) -> dict:
    """Greedy replies of every side under each repetition penalty in `penalties` ({"documented": 1.1, "greedy": 1.0}),
    all in one batch (PEFT runs each row with the adapter it names, "__base__" without one; each row has its own
    penalty), so every side and decoding gets the same prompts and padding: clean-stop rate and reply lengths, by
    decoding, then side."""
    adapters = sides(model)
    rows = [(decoding, name) for decoding in penalties for name in adapters]
    replies = generate_replies(
        model,
        tokenizer,
        prompts * len(rows),
        max_new_tokens,
        adapter_names=[adapters[name] for _, name in rows for _ in prompts],
        repetition_penalties=[penalties[decoding] for decoding, _ in rows for _ in prompts],
    )
    result = {decoding: {} for decoding in penalties}
    for i, (decoding, name) in enumerate(rows):
        side = replies[i * len(prompts) : (i + 1) * len(prompts)]
        lengths = sorted(r["new_tokens"] for r in side)
        result[decoding][name] = {
            "clean_stop_rate": sum(r["clean"] for r in side) / max(len(side), 1),
            "median_reply_tokens": lengths[len(lengths) // 2] if lengths else 0,
            "replies": side,
        }
    return result


def figures(model, tokenizer, held_out: Conversations, report_args, max_length: int | None) -> dict:
    """Loss and perplexity, with the adapter off (base) and on (tuned); clean-stop rates under plain greedy decoding
    and under the run's documented settings (--report_repetition_penalty). "base" and "tuned" hold the headline
    figures (the documented settings); "greedy" the plain-greedy ones."""
    from generation_utils import prompt_length
    from model_utils import context_length

    # Each held-out conversation's opening question (with its system message, if any), once per question, where the
    # question and a reply of the full budget fit the model's context.
    room = context_length(model) - report_args.report_max_new_tokens
    openings = {
        tuple(m["content"] for m in first_turn(e["messages"])): first_turn(e["messages"]) for e in held_out.examples
    }
    prompts = [p for p in openings.values() if prompt_length(tokenizer, p) <= room][: report_args.report_prompts]
    result = losses(model, tokenizer, held_out, max_length)
    penalty = report_args.report_repetition_penalty
    decodings = {"documented": penalty, "greedy": 1.0} if penalty != 1.0 else {"documented": penalty}
    logger.info(
        "Base and tuned replies to %d held-out prompts (%s)...",
        len(prompts),
        f"repetition penalty {penalty:g}, and plain greedy" if penalty != 1.0 else "plain greedy",
    )
    stops = clean_stops(model, tokenizer, prompts, report_args.report_max_new_tokens, decodings)
    documented = stops["documented"]
    greedy = stops.get("greedy", documented)
    for name in documented:
        result[name].update(documented[name])
    result["greedy"] = {name: {k: v for k, v in greedy[name].items() if k != "replies"} for name in greedy}
    result["loss_ratio"] = result["tuned"]["heldout_loss"] / result["base"]["heldout_loss"]
    result["prompts"] = [p[-1]["content"] for p in prompts]
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


def base_model_card(name_or_path: str):
    """The base model's own card data (for its license and Hub id), or None where there is none to be had offline."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from model_utils import hub_unreachable, looks_like_path

    try:
        if looks_like_path(name_or_path):
            readme = Path(name_or_path) / "README.md"
            return ModelCard.load(readme).data if readme.is_file() else None
        cached = try_to_load_from_cache(name_or_path, "README.md")
        if isinstance(cached, str):
            return ModelCard.load(cached).data
        return None if hub_unreachable(name_or_path) else ModelCard.load(name_or_path).data
    except (OSError, ValueError) as e:  # no card, a malformed one, or no network
        logger.warning("No model card for %s (%s): the license is 'other'; pass --license to set it.", name_or_path, e)
        return None


def model_card(run: dict, data: dict, train_metrics: dict, report: dict, has_plot: bool):
    """The model card: Hub metadata (base model, license, data set, held-out figures as model-index results) and a
    body with the data, the settings and the figures."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from model_utils import looks_like_path

    base_name = run["model_name_or_path"]
    base_card = base_model_card(base_name)
    # A Hub id, never a local path (the Hub rejects those): a local folder names the Hub model it copies in its card.
    hub_base = base_name if not looks_like_path(base_name) else getattr(base_card, "base_model", None)
    license_ = run.get("license", "auto")
    if license_ == "auto":
        license_ = getattr(base_card, "license", None) or "other"
    name = Path(run["output_dir"]).name
    heldout = {"task_type": "text-generation", "dataset_type": HUB_DATASET, "dataset_name": "oasst1 held-out trees"}
    tuned = report["tuned"]
    metadata = ModelCardData(
        model_name=name,
        base_model=hub_base,
        license=license_,
        library_name="peft",
        pipeline_tag="text-generation",
        datasets=[HUB_DATASET] if data["oasst1"] else None,
        tags=["qlora", "lora", "trl", "sft", "oasst1"],
        eval_results=[
            EvalResult(**heldout, metric_type="loss", metric_name="Held-out loss", metric_value=tuned["heldout_loss"]),
            EvalResult(
                **heldout,
                metric_type="perplexity",
                metric_name="Held-out perplexity",
                metric_value=tuned["heldout_perplexity"],
            ),
            EvalResult(
                **heldout,
                metric_type="clean_stop_rate",
                metric_name="Clean-stop rate",
                metric_value=tuned["clean_stop_rate"],
            ),
        ],
    )
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{card_body(name, run, data, train_metrics, report, has_plot)}")


def card_body(name: str, run: dict, data: dict, train_metrics: dict, report: dict, has_plot: bool) -> str:
    base, tuned, greedy = report["base"], report["tuned"], report["greedy"]
    rows = "\n".join(
        f"| {label} | {base[key]:{fmt}} | {tuned[key]:{fmt}} |"
        for label, key, fmt in (
            ("Held-out loss (assistant tokens)", "heldout_loss", ".4f"),
            ("Held-out perplexity", "heldout_perplexity", ".2f"),
            ("Clean-stop rate", "clean_stop_rate", ".0%"),
            ("Median reply length (tokens)", "median_reply_tokens", "d"),
        )
    )
    rows += f"\n| Clean-stop rate, plain greedy | {greedy['base']['clean_stop_rate']:.0%} | "
    rows += f"{greedy['tuned']['clean_stop_rate']:.0%} |"
    if "preference" in report:
        preference = report["preference"]
        for label, key in (("summed", "preference_accuracy"), ("per token", "preference_accuracy_per_token")):
            rows += (
                f"\n| Preference accuracy, {label} log-prob ({preference['tuned']['pairs_scored']} held-out pairs) "
                f"| {preference['base'][key]:.1%} | {preference['tuned'][key]:.1%} |"
            )
        rows += (
            f"\n| Reward accuracy: training raised the chosen reply more than the rejected one (against the "
            f"{preference['reward_against']} model) | | {preference['tuned']['reward_accuracy']:.1%} |"
        )
    if "sft" in report:  # the SFT adapter a DPO or ORPO run started from
        rows += (
            f"\n| The SFT adapter it started from: held-out loss, clean stop | | {report['sft']['heldout_loss']:.4f}, "
        )
        rows += f"{report['sft']['clean_stop_rate']:.0%}" + (
            f", preference accuracy {report['preference']['sft']['preference_accuracy']:.1%} |"
            if "preference" in report
            else " |"
        )
    if "unquantized" in report:
        unquantized = report["unquantized"]
        rows += (
            f"\n| Held-out loss, unquantized base (adapter off / on) | {unquantized['base']['heldout_loss']:.4f} "
            f"| {unquantized['tuned']['heldout_loss']:.4f} |"
        )
    # Where a reader loads it from: the Hub repository the run uploads to (--push_to_hub), else the output folder.
    where = run["hub_model_id"] if run.get("push_to_hub") and run.get("hub_model_id") else run["output_dir"]
    examples = "\n\n".join(
        f"**Prompt:** {prompt}\n\n- *Base:* {b['reply'][:600]!s}\n- *Tuned:* {t['reply'][:600]!s}"
        for prompt, b, t in list(zip(report["prompts"], base["replies"], tuned["replies"], strict=True))[
            : run.get("report_examples", 3)
        ]
    )
    filters = data.get("filters", {})
    return f"""
# {name}: a QLoRA adapter for {run["model_name_or_path"]}

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
- LoRA r {data["lora"]["r"]}, alpha {data["lora"]["lora_alpha"]}, dropout {data["lora"]["lora_dropout"]}, targets
  `{data["lora"]["target_modules"]}`; double quantization {run["bnb_4bit_use_double_quant"]}.
- {run["max_steps"]} steps of {card_global_batch(run, train_metrics)}, {run["max_length"]} tokens, learning rate
  {run["learning_rate"]} ({run["lr_scheduler_type"]}, warmup {run["warmup_steps"]}), optimizer {run["optim"]}, max grad
  norm {run["max_grad_norm"]}, seed {run["seed"]}.
- Hardware: {train_metrics.get("hardware", "n/a")}; training time {train_metrics.get("train_runtime", 0):.0f} s;
  final training loss {train_metrics.get("train_loss", float("nan")):.4f}.
- Framework versions: {framework_versions()}.

## Evaluation ({report["heldout_part"]} part: {data["heldout_trees"]} held-out trees, base vs tuned)

| | base | tuned |
|---|---|---|
{rows}

The loss covers every assistant turn of each held-out conversation, long ones included: a conversation longer than
{run["max_length"]} tokens is scored on the tokens that fit. The base and tuned columns run on the 4-bit base, as
trained and served; the last row loads the base unquantized, to show what 4-bit costs and what the adapter buys back.
Tuned/base held-out loss: {report["loss_ratio"]:.3f}. Clean stop: greedy replies (repetition penalty
{run.get("report_repetition_penalty", 1.0)}) to {len(report["prompts"])} held-out prompts, within
{run.get("report_max_new_tokens", "n/a")} new tokens, that end with EOS and invent no "### Human:" turn; the plain
greedy row uses no repetition penalty. These settings are saved as the adapter's `generation_config.json`:
`inference.py`, `app.py`, the merged model and `generate()` start from them.
{"" if not has_plot else chr(10) + "![training and held-out loss](loss.png)" + chr(10)}
## Examples

{examples}

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0][inputs["input_ids"].shape[1]:],
                       skip_special_tokens=True))
```

or, with the kit and this folder, `python inference.py "Hello!" --adapter {run["output_dir"]}`. The saved chat
template renders with plain Jinja2 (llama.cpp, TGI) as in training; a system message opens the first `### Human:`
turn, and tools are refused. An OpenAI-compatible endpoint: `python inference.py --adapter {run["output_dir"]}
--merge-to merged`, then `transformers serve merged --host 127.0.0.1 --port 8000`.
"""


def card_global_batch(run: dict, train_metrics: dict) -> str:
    """The run's global batch (trainer_setup.global_batch), from its settings and the Trainer's own count."""
    processes = train_metrics.get("processes", 1)
    micro_batch, accumulation = run["per_device_train_batch_size"], run["gradient_accumulation_steps"]
    total = train_metrics.get("global_batch_size", micro_batch * accumulation * processes)
    pairs = run.get("method", "sft") != "sft"
    return global_batch(micro_batch, accumulation, processes, total, pairs, run.get("packing"), run["max_length"])


def framework_versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"))


def lora_settings(folder: Path) -> dict:
    """The adapter's own record of its LoRA settings (what was trained, whatever the config file said)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = config["target_modules"]
    config["target_modules"] = ",".join(sorted(targets)) if isinstance(targets, list) else targets
    return {key: config[key] for key in ("r", "lora_alpha", "lora_dropout", "target_modules")}


def settings(cls, run: dict):
    """One settings dataclass, filled from run_config.yaml."""
    return cls(**{f.name: run[f.name] for f in fields(cls) if f.init and f.name in run})


def parse_args(args: list[str] | None) -> tuple[Path, dict, ReportArguments]:
    """The output folder, its run_config.yaml, and the report settings: the run's, with these flags' overrides."""
    from checkpoint_utils import read_run_config

    parser = argument_parser((ReportFolderArguments, ReportArguments), description=__doc__)
    known, unknown = parser.parse_known_args(args)
    report_flags = {f"--{f.name}" for f in fields(ReportArguments)}
    for flag in unknown:
        if flag.startswith("--") and flag.split("=")[0] not in report_flags:
            flags = ", ".join(sorted(report_flags))
            raise UserError(f"{flag}: report.py takes --model_dir and the report settings ({flags}).")
    folder = Path(known.model_dir)
    run = read_run_config(folder)
    parser.set_defaults(**{f.name: run[f.name] for f in fields(ReportArguments) if f.name in run})
    _, report_args = parser.parse_args_into_dataclasses(args)
    return folder, run, report_args


def main(args: list[str] | None = None) -> dict | None:
    """Write the report of a finished run; a user's mistake ends in one line (exit 2)."""
    from model_utils import is_main_process

    if not is_main_process():  # under torchrun/accelerate launch: one process evaluates and writes the report
        return None
    try:
        return write_report(*parse_args(args))
    except UserError as e:
        fail(str(e))


def write_report(folder: Path, run: dict, report_args: ReportArguments) -> dict:
    import gc

    from adapter_utils import find_adapter, load_chat_model
    from data_utils import load_train_and_eval
    from training_examples import prepare_examples

    # 1. The held-out conversations: the test part if the run has one, else the dev part training evaluated on.
    # Never filtered by length: a long conversation is scored on its first --max_length tokens.
    train_data, dev, test = load_train_and_eval(settings(DataArguments, run))
    held_out, part = (test, "test") if test and report_args.report_on == "test" else (dev, "dev")
    if held_out is None or not held_out.examples:
        raise UserError("no held-out data in this run: train with --eval_fraction, --eval_dataset or --eval_split.")
    model_args, quant_args = settings(ModelArguments, run), settings(QuantizationArguments, run)
    base = model_args.model_name_or_path
    pairs = held_out_pairs(settings(DataArguments, run), part)
    model, tokenizer = load_chat_model(folder, base, quant_args, model_args.attn_implementation)
    if run.get("init_adapter"):  # a DPO or ORPO run from an SFT adapter: that adapter is compared too
        model.load_adapter(str(find_adapter(run["init_adapter"])), adapter_name=START_ADAPTER)
        model.set_adapter("default")
    train_data = prepare_examples(train_data, tokenizer, run["max_length"], run["long_examples"])

    # 2. The figures, base (adapter off), the adapter the run started from (if any) and tuned, on the base as trained
    # (4-bit): loss, clean stops and preference accuracy on held-out pairs; then the losses on the unquantized base,
    # to show what quantization cost and what the adapter buys back.
    report = figures(model, tokenizer, held_out, report_args, run["max_length"])
    report["heldout_part"], report["heldout_ids"] = part, [e["id"] for e in held_out.examples]
    if pairs is not None:
        report["preference"] = preference_accuracy(model, tokenizer, pairs, run["max_length"])
    # The decoding settings the clean-stop rate was measured with become the adapter's own: inference.py, app.py,
    # the merged model and any generate() start from them.
    documented_decoding(tokenizer, report_args).save_pretrained(folder)
    if quant_args.load_in_4bit:
        del model
        gc.collect()
        unquantized = QuantizationArguments(
            load_in_4bit=False, bnb_4bit_compute_dtype=quant_args.bnb_4bit_compute_dtype
        )
        model, _ = load_chat_model(folder, base, unquantized, model_args.attn_implementation)
        report["unquantized"] = losses(model, tokenizer, held_out, run["max_length"])
    del model
    gc.collect()

    # 3. The files: eval.json, loss.png, README.md.
    state_file, metrics_file = folder / "trainer_state.json", folder / "train_results.json"
    log_history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    train_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    train_metrics.pop("heldout_ids", None)
    data = {
        "train_examples": len(train_data.examples),
        "heldout_examples": len(held_out.examples),
        "heldout_trees": len({e["tree_id"] for e in held_out.examples}),
        "filters": dict(train_data.counts),
        "oasst1": "messages" in train_data.counts,  # built from oasst1 rows or trees, not the user's own chats
        "lora": lora_settings(folder),
    }
    has_plot = plot_losses(log_history, folder / "loss.png")
    (folder / "eval.json").write_text(json.dumps({**report, "data": data, "training": train_metrics}, indent=2))
    run = {**run, **vars(report_args)}
    model_card(run, data, train_metrics, report, has_plot).save(folder / "README.md")
    print(
        summary(report)
        + f"; wrote {folder / 'eval.json'}, {folder / 'README.md'}"
        + (", loss.png" if has_plot else "")
    )
    return report


def held_out_pairs(data_args: DataArguments, part: str) -> Conversations | None:
    """The preference pairs (best_vs_rest, whatever the run trained on, so that every run is scored on the same
    pairs) of the held-out trees the report scores; None where the data has no ranks (your own conversations)."""
    from data_utils import load_train_and_eval

    try:
        _, dev, test = load_train_and_eval(data_args, held_out_policy=REPORT_PAIR_POLICY)
    except DataError as e:
        logger.info("No preference accuracy: %s", e)
        return None
    pairs = test if part == "test" else dev
    return pairs if pairs is not None and pairs.examples else None


def documented_decoding(tokenizer, report_args: ReportArguments):
    """The report's decoding settings as a transformers GenerationConfig: greedy, its repetition penalty and budget."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=report_args.report_max_new_tokens,
        repetition_penalty=report_args.report_repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def summary(report: dict) -> str:
    """The report's figures in a few lines, as the demo and train.py print them."""
    base, tuned, greedy = report["base"], report["tuned"], report["greedy"]
    lines = [f"held-out loss (assistant tokens), {report['heldout_part']} part, {report['assistant_tokens']} tokens:"]
    if "unquantized" in report:
        unquantized = report["unquantized"]
        lines.append(
            f"  base unquantized {unquantized['base']['heldout_loss']:.4f} | base 4-bit {base['heldout_loss']:.4f} | "
            f"tuned on 4-bit {tuned['heldout_loss']:.4f} (x{report['loss_ratio']:.3f}) | adapter on the unquantized "
            f"base {unquantized['tuned']['heldout_loss']:.4f}"
        )
    else:
        lines.append(
            f"  base {base['heldout_loss']:.4f} | tuned {tuned['heldout_loss']:.4f} (x{report['loss_ratio']:.3f})"
        )
    lines.append(
        f"clean-stop rate on {len(report['prompts'])} prompts: base {base['clean_stop_rate']:.0%} -> tuned "
        f"{tuned['clean_stop_rate']:.0%}; plain greedy: base {greedy['base']['clean_stop_rate']:.0%} -> tuned "
        f"{greedy['tuned']['clean_stop_rate']:.0%}"
    )
    if "sft" in report:
        sft = report["sft"]
        lines.append(
            f"the SFT adapter it started from: held-out loss {sft['heldout_loss']:.4f}, clean-stop rate "
            f"{sft['clean_stop_rate']:.0%} (plain greedy {greedy['sft']['clean_stop_rate']:.0%})"
        )
    if "preference" in report:
        preference = report["preference"]
        shown = " | ".join(
            f"{name} {figures['preference_accuracy']:.1%} / {figures['preference_accuracy_per_token']:.1%}"
            for name, figures in preference.items()
            if name in ("base", "sft", "tuned")
        )
        lines.append(
            f"preference accuracy on {preference['tuned']['pairs_scored']} held-out pairs (summed / per-token "
            f"log-prob): {shown}; reward accuracy (tuned against {preference['reward_against']}) "
            f"{preference['tuned']['reward_accuracy']:.1%}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    quiet_known_noise()
    main()

"""Scoring a run on held-out data, base against tuned: the loss on assistant tokens, the log-probabilities of
preference pairs (preference and reward accuracy), and the clean-stop rate of greedy replies. One model in memory
holds every side: the base (adapters off), the adapter a run started from, and the tuned adapter.
"""

import contextlib
import logging
import math

import torch

from chat_template import HUMAN, first_turn
from config import GenerationArguments
from data_utils import Conversations
from generation_utils import generate_replies, prompt_length
from model_utils import context_length

logger = logging.getLogger(__name__)


# The report's batches are bounded in memory, not rows, so that they fit a 15 GB T4 next to Phi-2: a generate call
# holds the KV cache of every prompt and reply token in it (5 GiB: 16,384 tokens of Phi-2 in fp16, all of a small
# model's rows at once), a loss forward the logits (a vocabulary's worth of them) of every token in it, and no KV cache
# (use_cache=False: Phi-2's config turns it on, and nothing would read it).
GENERATION_KV_CACHE_BYTES = 5 * 2**30
LOSS_BATCH_TOKENS = 2048


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


def clean_stop_replies(model, tokenizer, prompts, max_new_tokens: int, repetition_penalty: float = 1.0, **per_row):
    """Greedy replies, batched (generation_utils.generate_replies) within GENERATION_KV_CACHE_BYTES of KV cache a
    batch, each marked clean when it stopped at EOS without inventing a "### Human:" turn. `per_row`:
    `adapter_names` for PEFT models, `repetition_penalties` in place of `repetition_penalty`."""
    longest = max(prompt_length(tokenizer, p) for p in prompts) + max_new_tokens
    greedy = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=repetition_penalty)
    batch_size = max(1, GENERATION_KV_CACHE_BYTES // (longest * kv_cache_bytes_per_token(model)))
    # A reply that invents a "### Human:" turn is unclean whatever follows: its row stops there, not at the budget.
    results = generate_replies(
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
    replies = clean_stop_replies(
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

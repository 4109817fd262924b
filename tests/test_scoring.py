"""scoring.py: the report's figures checked by hand on the tiny model (losses, log-probabilities, preference and
reward accuracy, clean-stop replies) and the memory bounds of its batches."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import scoring
from adapter_utils import load_chat_model
from data_utils import Conversations
from scoring import (
    GENERATION_KV_CACHE_BYTES,
    assistant_token_loss,
    clean_stop_replies,
    kv_cache_bytes_per_token,
    loss_labels,
    pair_figures,
    reply_log_probs,
    reward_accuracy,
)

CONVERSATION = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water for 9 minutes."},
    {"role": "user", "content": "And a soft one?"},
    {"role": "assistant", "content": "About 6 minutes."},
]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def model(tiny_phi):
    return AutoModelForCausalLM.from_pretrained(tiny_phi, dtype=torch.float32).eval()


def by_hand_nll(model, tokenizer, conversation, trained_texts):
    """Sum of -log p over the tokens of `trained_texts` (each an assistant reply plus EOS), found by position."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total, count = 0.0, 0
    for trained in trained_texts:
        start_char = text.index(trained)
        prefix_len = len(tokenizer(text[:start_char], add_special_tokens=False)["input_ids"])
        target = tokenizer(trained, add_special_tokens=False)["input_ids"]
        assert ids[prefix_len : prefix_len + len(target)] == target
        for offset, token in enumerate(target):
            total -= log_probs[prefix_len + offset - 1, token].item()
            count += 1
    return total, count


def test_heldout_loss_is_the_cross_entropy_over_assistant_tokens(model, tokenizer):
    eos = tokenizer.eos_token
    loss, tokens = assistant_token_loss(
        model, tokenizer, Conversations([{"messages": CONVERSATION}, {"messages": SHORT}], "all"), 512
    )
    nll_a, n_a = by_hand_nll(
        model, tokenizer, CONVERSATION, [" Put it in boiling water for 9 minutes." + eos, " About 6 minutes." + eos]
    )
    nll_b, n_b = by_hand_nll(model, tokenizer, SHORT, [" Hello!" + eos])
    assert tokens == n_a + n_b
    assert loss == pytest.approx((nll_a + nll_b) / (n_a + n_b), abs=1e-5)

    last_only, last_tokens = assistant_token_loss(
        model, tokenizer, Conversations([{"messages": CONVERSATION}], "last"), 512
    )
    nll, n = by_hand_nll(model, tokenizer, CONVERSATION, [" About 6 minutes." + eos])
    assert last_tokens == n and last_only == pytest.approx(nll / n, abs=1e-5)


def test_loss_labels_follow_truncation(tokenizer):
    ids, labels = loss_labels(tokenizer, CONVERSATION, "all", max_length=12)
    assert len(ids) == len(labels) == 12


@pytest.mark.slow
def test_base_and_tuned_replies_in_one_batch_match_separate_runs(yes_adapter):
    """The report generates base rows ("__base__": adapter off) and tuned rows in one batch."""

    model, tokenizer = load_chat_model(yes_adapter)  # 4-bit base, as the report loads it
    prompts = [[{"role": "user", "content": "Is the grass green?"}], [{"role": "user", "content": "Hi there"}]]
    mixed = clean_stop_replies(
        model, tokenizer, prompts + prompts, 8, adapter_names=["__base__"] * 2 + ["default"] * 2
    )
    tuned = clean_stop_replies(model, tokenizer, prompts, 8)
    with model.disable_adapter():
        base = clean_stop_replies(model, tokenizer, prompts, 8)
    assert [r["reply"] for r in tuned] == ["Yes.", "Yes."] and all(r["clean"] for r in tuned)
    assert mixed == base + tuned
    assert all(r["reply"] != "Yes." for r in base)


def test_generation_batches_are_bounded_by_the_kv_cache_they_hold(tiny_phi):

    # What one token's keys and values take, measured on a real cache.
    model = AutoModelForCausalLM.from_pretrained(tiny_phi)
    cache = model(torch.tensor([[5, 6, 7, 8, 9]]), use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == 5 * kv_cache_bytes_per_token(model)

    # Phi-2 in fp16 (the arithmetic of GENERATION_KV_CACHE_BYTES): 16,384 tokens a generate call; SmolLM2 in float32
    # (grouped-query attention, 3 key-value heads): the demo's 40 rows of prompt and 512-token reply in one call.
    phi2 = AutoConfig.for_model("phi", num_hidden_layers=32, num_attention_heads=32, hidden_size=2560)
    smollm2 = AutoConfig.for_model(
        "llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576
    )
    with torch.device("meta"):
        phi2 = AutoModelForCausalLM.from_config(phi2, dtype=torch.float16)
        smollm2 = AutoModelForCausalLM.from_config(smollm2, dtype=torch.float32)
    assert kv_cache_bytes_per_token(phi2) == 327_680 and GENERATION_KV_CACHE_BYTES // 327_680 == 16_384
    assert kv_cache_bytes_per_token(smollm2) == 46_080 and GENERATION_KV_CACHE_BYTES // (46_080 * 600) >= 40


def test_reply_log_probs_are_the_summed_log_probs_of_each_reply(model, tokenizer):
    eos = tokenizer.eos_token
    pair = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3:], "rejected": [SHORT[1]]}
    ((chosen, n_chosen, rejected, n_rejected),) = reply_log_probs(
        model, tokenizer, Conversations([pair], "pairs"), 512
    )
    nll_c, n_c = by_hand_nll(model, tokenizer, CONVERSATION, [" About 6 minutes." + eos])
    nll_r, n_r = by_hand_nll(model, tokenizer, CONVERSATION[:3] + [SHORT[1]], [" Hello!" + eos])
    assert (n_chosen, n_rejected) == (n_c, n_r)
    assert chosen == pytest.approx(-nll_c, abs=1e-4) and rejected == pytest.approx(-nll_r, abs=1e-4)
    # Summed and per token can disagree: a longer reply loses more log-probability in all.
    figures = pair_figures([(-10.0, 10, -4.0, 2), (-1.0, 1, -3.0, 1), (-2.0, 2, -2.0, 2), (-1.0, 0, -1.0, 1)])
    assert figures == {
        "preference_accuracy": 1 / 3,  # only the second pair; the tie counts as a miss; the last has no token
        "preference_accuracy_per_token": 2 / 3,  # -1 a token beats -2 a token in the first pair
        "mean_margin": (-6.0 + 2.0 + 0.0) / 3,
        "pairs_scored": 3,
    }


def test_a_reply_shared_by_pairs_is_scored_once_with_the_same_result(model, tokenizer, monkeypatch):
    # best_vs_rest: one context's best reply against two others; the chosen sequence is the same in both pairs.
    prompt, best = CONVERSATION[:3], CONVERSATION[3:]
    others = [[SHORT[1]], [{"role": "assistant", "content": "Six minutes, give or take."}]]
    pairs = [{"prompt": prompt, "chosen": best, "rejected": other} for other in others]
    alone = [scoring.reply_log_probs(model, tokenizer, Conversations([p], "pairs"), 512)[0] for p in pairs]
    scored_rows = []
    batches = scoring.padded_batches
    monkeypatch.setattr(
        scoring, "padded_batches", lambda m, t, rows, n: scored_rows.extend(rows) or batches(m, t, rows, n)
    )
    together = scoring.reply_log_probs(model, tokenizer, Conversations(pairs, "pairs"), 512)
    assert len(scored_rows) == 3  # the shared chosen reply once, and the two rejected ones
    assert together[0][0] == together[1][0] and together[0][1] == together[1][1]
    for got, want in zip(together, alone, strict=True):
        assert got[1::2] == want[1::2] and got[0::2] == pytest.approx(want[0::2], abs=1e-4)


def test_reward_accuracy_counts_what_training_moved_not_where_the_replies_stand():
    start = [(-30.0, 10, -10.0, 5), (-30.0, 10, -10.0, 5), (-5.0, 2, -5.0, 2), (-1.0, 0, -1.0, 1)]
    tuned = [
        (-25.0, 10, -10.0, 5),  # chosen up 5 nats, rejected level: a hit, though rejected still scores higher
        (-31.0, 10, -10.5, 5),  # chosen down 1, rejected down 0.5: a miss, though both fell
        (-4.0, 2, -4.0, 2),  # both up by the same: a tie, a miss
        (-9.0, 0, -1.0, 1),  # no chosen token in the budget: not counted
    ]
    assert reward_accuracy(tuned, start) == 1 / 3


def test_the_loss_forwards_build_no_kv_cache(model, tokenizer):
    """Phi-2's config has use_cache true: a plain forward builds a KV cache for every token of the batch, which the
    report's scoring never reads (for a 2,048-token batch of Phi-2 in fp16, 0.6 GiB)."""
    outputs = []
    hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
        assert model.config.use_cache and model(input_ids=ids).past_key_values is not None  # what a plain call does
        outputs.clear()
        assistant_token_loss(model, tokenizer, Conversations([{"messages": CONVERSATION}], "all"), 512)
        pair = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3:], "rejected": [SHORT[1]]}
        reply_log_probs(model, tokenizer, Conversations([pair], "pairs"), 512)
    finally:
        hook.remove()
    assert len(outputs) == 2 and all(output.past_key_values is None for output in outputs)

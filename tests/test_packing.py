"""Packing without contamination: TRL's packed, padding-free batches train exactly what one example at a time does."""

import logging

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from test_chat_template import CONVERSATION, OTHER, segments

from adapter_utils import build_lora_config
from config import LoraArguments, ModelArguments, QuantizationArguments
from data_utils import Conversations, load_conversations
from model_utils import load_model
from train_settings import TrainingConfig
from trainer_setup import build_trainer, packed_examples_stay_apart
from training_examples import drop_untrainable_examples, to_training_records


@pytest.fixture(scope="module")
def short_conversations(sample_path, tokenizer) -> list[dict]:
    """Eight real conversations from the sample short enough that several share a packed row of 512 tokens."""
    examples = load_conversations(str(sample_path)).examples
    short = [
        e for e in examples if len(tokenizer.apply_chat_template(e["messages"], return_dict=True)["input_ids"]) < 200
    ]
    assert len(short) >= 8
    return [{"messages": e["messages"]} for e in short[:8]]


def trainer_for(
    tiny_phi, tokenizer, tmp_path, conversations, packing, load_in_4bit=False, attn="sdpa", max_length=512
):
    model = load_model(
        ModelArguments(model_name_or_path=str(tiny_phi), attn_implementation=attn),
        QuantizationArguments(load_in_4bit=load_in_4bit),
    )
    args = TrainingConfig(
        output_dir=str(tmp_path), max_length=max_length, report_to="none", max_steps=1, packing=packing, seed=0
    )
    records = to_training_records(Conversations(conversations, "all"))
    lora = build_lora_config(LoraArguments(lora_r=8, lora_dropout=0.0), "phi")
    trainer = build_trainer(model, tokenizer, args, Dataset.from_list(records), peft_config=lora)
    trainer.model.eval()  # no dropout: the comparison must be exact
    return trainer


def split_row(row: dict) -> list[tuple[list[int], list[int]]]:
    """A packed row back into its examples' (input_ids, labels)."""
    out, start = [], 0
    for length in row["seq_lengths"]:
        out.append((row["input_ids"][start : start + length], row["labels"][start : start + length]))
        start += length
    return out


def packed_batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return rows, trainer.data_collator(rows)


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["float32", "4bit-nf4"])
def test_packed_loss_equals_the_token_weighted_loss_of_the_examples_one_at_a_time(
    tiny_phi, tokenizer, tmp_path, short_conversations, load_in_4bit
):
    trainer = trainer_for(tiny_phi, tokenizer, tmp_path, short_conversations, True, load_in_4bit)
    unpacked = trainer_for(tiny_phi, tokenizer, tmp_path / "unpacked", short_conversations, False).train_dataset
    rows, batch = packed_batch(trainer)
    examples = [example for row in rows for example in split_row(row)]
    # Packing really packed (fewer rows than examples) and lost or cut nothing: the same token ids and loss masks as
    # the unpacked preparation, in another order.
    assert len(rows) < len(examples) == len(unpacked) == 8
    assert sorted(examples) == sorted((e["input_ids"], e["labels"]) for e in unpacked)
    # One padding-free row, no attention mask, and positions that restart at every example.
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    expected_positions = [p for ids, _ in examples for p in range(len(ids))]
    assert batch["position_ids"][0].tolist() == expected_positions

    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        total, tokens = 0.0, 0
        for ids, labels in examples:
            logits = trainer.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
    assert tokens == int((batch["labels"] != -100).sum()) > 100
    assert packed_loss == pytest.approx(total / tokens, abs=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_example_leaves_its_neighbours_logits_unchanged(
    tiny_phi, tokenizer, tmp_path, short_conversations, attn
):
    trainer = trainer_for(tiny_phi, tokenizer, tmp_path, short_conversations, True, attn=attn)
    rows, batch = packed_batch(trainer)
    lengths = [n for row in rows for n in row["seq_lengths"]]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    changed = 1  # an example in the middle of the row: it has neighbours on both sides
    inside = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
    inside[starts[changed] : starts[changed + 1]] = True
    altered = batch["input_ids"].clone()
    altered[0, inside] = torch.randint(
        0, len(tokenizer), (int(inside.sum()),), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        before = trainer.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        after = trainer.model(input_ids=altered, position_ids=batch["position_ids"]).logits[0]
    assert (before[inside] - after[inside]).abs().max() > 1e-2  # the change is visible where it should be
    assert torch.allclose(before[~inside], after[~inside], atol=1e-5, rtol=0)


def test_packed_rows_keep_the_assistant_only_masks(tiny_phi, tokenizer, tmp_path):
    trainer = trainer_for(tiny_phi, tokenizer, tmp_path, [{"messages": CONVERSATION}, {"messages": OTHER}], True)
    rows, batch = packed_batch(trainer)
    assert len(rows) == 1 and len(rows[0]["seq_lengths"]) == 2  # both in one row
    expected = {tuple(segments(tokenizer, CONVERSATION, {1, 3})[0]): segments(tokenizer, CONVERSATION, {1, 3})[1]}
    expected[tuple(segments(tokenizer, OTHER, {1})[0])] = segments(tokenizer, OTHER, {1})[1]
    for ids, labels in split_row(rows[0]):
        assert labels == expected[tuple(ids)]
    # The collator masks each example's first token (it has no previous token in its own example); it is a human
    # turn's, so nothing trained is lost, and the trained tokens are exactly the two replies and their EOS.
    trained = batch["labels"][0][batch["labels"][0] != -100].tolist()
    replies = [t for _, labels in split_row(rows[0]) for t in labels if t != -100]
    assert trained == replies
    assert tokenizer.decode(trained).count(tokenizer.eos_token) == 3


def test_examples_that_truncation_leaves_nothing_to_train_are_dropped_before_packing(
    tiny_phi, tokenizer, tmp_path, short_conversations
):
    # The first trained token (the reply's first) sits right after the prompt and its "### Assistant:" header.
    def first_trained_token(conversation):
        prompt = conversation["messages"][:1]
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])

    by_prompt = sorted(short_conversations, key=first_trained_token)
    conversation, others = by_prompt[-1], by_prompt[:3]
    start = first_trained_token(conversation)
    assert all(first_trained_token(c) < start for c in others)

    def trained_tokens_per_example(examples, max_length):
        trainer = trainer_for(tiny_phi, tokenizer, tmp_path / str(max_length), examples, True, max_length=max_length)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        return sorted(sum(label != -100 for label in labels) for row in rows for _, labels in split_row(row))

    # Cut right after the prompt, the example has nothing to train; TRL's packing keeps it anyway (a row of compute
    # for nothing), so the repo drops it first. One token more and the reply's first token is trained: it stays.
    assert trained_tokens_per_example([conversation], start) == [0]
    assert trained_tokens_per_example([conversation], start + 1) == [1]
    conversations = Conversations([conversation, *others], "all")
    dropped = drop_untrainable_examples(conversations, tokenizer, start)
    assert dropped.examples == others and dropped.counts["prompt_too_long"] == 1
    kept = drop_untrainable_examples(conversations, tokenizer, start + 1)
    assert kept.examples == conversations.examples and kept.counts["prompt_too_long"] == 0
    assert 0 not in trained_tokens_per_example(dropped.examples, start)


def causal_only_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention kernel that knows only causality, as some custom kernels and remote code do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_attention_that_would_mix_packed_examples_falls_back_to_length_grouping(
    tiny_phi, tokenizer, tmp_path, short_conversations, caplog
):
    from transformers import AttentionInterface

    AttentionInterface.register("causal_only_for_test", causal_only_attention)
    sdpa = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(load_in_4bit=False))
    assert packed_examples_stay_apart(sdpa)
    with caplog.at_level(logging.WARNING, logger="trainer_setup"):
        trainer = trainer_for(tiny_phi, tokenizer, tmp_path, short_conversations, True, attn="causal_only_for_test")
    assert "Packing is off" in caplog.text
    assert not trainer.args.packing and not trainer.args.padding_free and not trainer.padding_free
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert len(trainer.train_dataset) == len(short_conversations)  # one example per row: nothing packed
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert "attention_mask" in batch and "position_ids" not in batch


def test_weights_on_the_meta_device_are_judged_by_the_attention_implementation(tiny_phi):
    """Under FSDP's memory-efficient loading, all processes but the first hold meta weights: no probe can run."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register("causal_only_for_test", causal_only_attention)
    for attn, apart in (("sdpa", True), ("eager", True), ("causal_only_for_test", False)):
        config = AutoConfig.from_pretrained(tiny_phi, attn_implementation=attn)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        assert packed_examples_stay_apart(model) is apart

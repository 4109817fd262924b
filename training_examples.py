"""The examples a run trains on: conversations that fit --max_length by the tokenizer's count, in TRL's record shapes.

Training and the report both call `prepare_examples`, so they see the same list. Held-out data is never filtered
here: the report scores a long conversation on the tokens that fit (data_utils.load_train_and_eval).
"""

import logging
from collections import Counter

from chat_template import first_turn
from config import DataError
from data_utils import Conversations

logger = logging.getLogger(__name__)


def prepare_examples(conversations: Conversations, tokenizer, max_length: int | None, long_examples: str):
    """The training examples: those longer than max_length dropped when --long_examples drop asks for it, then those
    that truncation would leave with nothing to train. Held-out data is never filtered (load_train_and_eval)."""
    if long_examples == "drop":
        conversations = drop_long_examples(conversations, tokenizer, max_length)
    return drop_untrainable_examples(conversations, tokenizer, max_length)


def drop_long_examples(conversations: Conversations, tokenizer, max_length: int | None) -> Conversations:
    """Keep the examples whose templated text fits in max_length tokens (so their final EOS is trained)."""
    if max_length is None:
        return conversations
    kept = [
        e
        for e in conversations.examples
        if all(
            len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]) <= max_length
            for messages in trained_conversations(e)
        )
    ]
    counts = Counter(conversations.counts)
    counts["too_long"] = len(conversations.examples) - len(kept)
    logger.info(
        "Dropped %d of %d examples longer than %d tokens.", counts["too_long"], len(conversations.examples), max_length
    )
    if not kept:
        raise DataError(f"every example is longer than --max_length {max_length}; raise it or use truncation.")
    return Conversations(kept, conversations.loss_on, counts)


def drop_untrainable_examples(conversations: Conversations, tokenizer, max_length: int | None) -> Conversations:
    """--max_length must leave room for what the loss covers: truncation keeps the start of an example, so an example
    whose first trained reply starts past max_length tokens would train nothing (every label masked). Without packing
    TRL drops such examples itself; packed, they would still fill a row with compute that trains nothing. Drop them
    here, for both."""
    if max_length is None:
        return conversations
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    overhead = len(tokenizer.apply_chat_template(empty, return_dict=True)["input_ids"])
    if max_length <= overhead:
        raise DataError(
            f"--max_length {max_length} is too short for the conversation template: an empty exchange already takes "
            f"{overhead} tokens (the default is 512)."
        )

    # The prompt before the first reply in the loss: the first user turn (with the system message that opens it), or
    # the whole context for loss on the last reply (and for a preference pair).
    def prompt(conversation: list[dict]) -> list[dict]:
        return first_turn(conversation) if conversations.loss_on == "all" else conversation[:-1]

    kept = [
        e
        for e in conversations.examples
        if len(
            tokenizer.apply_chat_template(
                prompt(trained_conversations(e)[0]), add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        < max_length
    ]
    if not kept:
        raise DataError(
            f"--max_length {max_length} is too short for this data: in every example the prompt before the first "
            "trained reply is longer, so nothing would be trained; raise --max_length."
        )
    counts = Counter(conversations.counts)
    counts["prompt_too_long"] = len(conversations.examples) - len(kept)
    if counts["prompt_too_long"]:
        logger.info(
            "Dropped %d of %d examples whose prompt is longer than --max_length %d: truncation leaves them nothing to "
            "train.",
            counts["prompt_too_long"],
            len(conversations.examples),
            max_length,
        )
    return Conversations(kept, conversations.loss_on, counts)


def trained_conversations(example: dict) -> list[list[dict]]:
    """The conversations an example trains on: itself, or a preference pair's prompt with each of its replies."""
    if "messages" in example:
        return [example["messages"]]
    return [example["prompt"] + example["chosen"], example["prompt"] + example["rejected"]]


def to_training_records(conversations: Conversations) -> list[dict]:
    """Rows for TRL's SFTTrainer: conversational `messages` (loss on all assistant turns), or prompt/completion
    (loss on the completion, i.e. the final reply, only); for its DPOTrainer and ORPOTrainer, conversational
    prompt/chosen/rejected."""
    if conversations.loss_on == "pairs":
        return [{key: e[key] for key in ("prompt", "chosen", "rejected")} for e in conversations.examples]
    if conversations.loss_on == "all":
        return [{"messages": e["messages"]} for e in conversations.examples]
    return [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in conversations.examples]

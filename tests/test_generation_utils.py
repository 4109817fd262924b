"""generation_utils.py on the tiny model: batched replies (each row with its own adapter and repetition penalty,
finished rows leaving the batch), history trimmed to the context, and streamed replies that stop when asked."""

import pytest
import torch

from adapter_utils import load_chat_model
from config import GenerationArguments, QuantizationArguments
from generation_utils import (
    DECODE_CHUNK_TOKENS,
    generate_replies,
    generate_reply,
    history_that_fits,
    prompt_length,
    stream_reply,
)

GREEDY = GenerationArguments(max_new_tokens=6, temperature=0)
FLOAT32 = QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype="float32")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversation(text: str) -> list[dict]:
    return [user(text)]


@pytest.mark.slow
def test_batched_generation_reports_the_reply_before_eos(yes_adapter):
    model, tokenizer = load_chat_model(yes_adapter, quant_args=FLOAT32)
    results = generate_replies(model, tokenizer, [[user("Is it sunny?")], [user("Do you like tea?")]], GREEDY)
    assert results == [{"reply": "Yes.", "stopped": True}, {"reply": "Yes.", "stopped": True}]


def test_a_repetition_penalty_for_each_row_decodes_each_row_as_that_penalty_alone(base_model):
    """The report decodes with its repetition penalty and without one in the same batch: each row as transformers'
    own repetition_penalty decodes it."""
    model, tokenizer = base_model
    prompts = [[user("Is the grass green?")], [user("Tell me about the sea and the sky.")]]
    plain = GenerationArguments(max_new_tokens=24, temperature=0)
    penalty = GenerationArguments(max_new_tokens=24, temperature=0, repetition_penalty=3.0)
    mixed = generate_replies(model, tokenizer, prompts * 2, plain, repetition_penalties=[3.0, 3.0, 1.0, 1.0])
    alone = generate_replies(model, tokenizer, prompts, penalty) + generate_replies(model, tokenizer, prompts, plain)
    assert mixed == alone
    assert alone[:2] != alone[2:]  # the penalty changes these replies, so each row's own penalty is really checked


def test_history_that_fits_drops_whole_exchanges_oldest_first(tokenizer):
    messages = [user("one " * 20), assistant("two " * 20), user("three"), assistant("four"), user("five")]
    limit = prompt_length(tokenizer, messages[2:])
    assert history_that_fits(tokenizer, messages, limit) == (messages[2:], 1)
    assert history_that_fits(tokenizer, messages, limit - 1) == (messages[4:], 2)
    assert history_that_fits(tokenizer, messages, 10_000) == (messages, 0)


def test_stream_reply_grows_to_the_whole_reply(base_model):
    model, tokenizer = base_model
    messages = [user("Tell me about France")]
    updates = list(stream_reply(model, tokenizer, messages, GREEDY))
    assert updates[-1] == generate_reply(model, tokenizer, messages, GREEDY)
    assert len(updates) > 1 and all(a != b for a, b in zip(updates, updates[1:], strict=False))


def test_stream_reply_raises_instead_of_hanging(base_model):
    model, tokenizer = base_model
    # A generation that fails in its thread: the error reaches the caller.
    with pytest.raises(ValueError, match="penalty"):
        list(stream_reply(model, tokenizer, [user("Hi")], GenerationArguments(repetition_penalty=-1.0)))
    # A generation slower than the streamer's patience: a clear timeout, not a wait without end.
    with pytest.raises(TimeoutError, match="produced nothing"):
        list(stream_reply(model, tokenizer, [user("Hi")], GenerationArguments(max_new_tokens=200), timeout=1e-6))


def test_closing_the_stream_stops_the_generation(base_model):
    # The page's stop button closes the stream: the model must stop at once, not finish the reply unseen.
    model, tokenizer = base_model
    forward_calls = []
    hook = model.register_forward_hook(lambda *_: forward_calls.append(1))
    try:
        stream = stream_reply(model, tokenizer, [user("Hi")], GenerationArguments(max_new_tokens=900, temperature=0))
        next(stream)
        stream.close()  # returns once the generation thread is done
        assert len(forward_calls) < 10  # one forward pass per token: it stopped within a few of 900
    finally:
        hook.remove()


@pytest.mark.slow
def test_finished_rows_leave_the_batch_and_the_tokens_are_those_of_one_generate_call(yes_adapter):
    """Tuned rows answer "Yes." and end; base rows (a random model) run on; one base row ends at a stop string in
    its second chunk. Rows that ended are no longer computed, and every reply is the one a single generate() call
    over all rows gives."""
    model, tokenizer = load_chat_model(yes_adapter, quant_args=FLOAT32)
    prompts = [
        conversation("Is it sunny?"),
        conversation("Tell me about the sea."),
        conversation("Do cats purr?"),
        conversation("Name a colour."),
    ]
    adapters = ["default", "__base__", "default", "__base__"]
    greedy = GenerationArguments(max_new_tokens=3 * DECODE_CHUNK_TOKENS, temperature=0)
    unstopped = generate_replies(model, tokenizer, prompts, greedy, adapter_names=adapters, count_tokens=True)
    # Text the last row first writes in its second half (after its first chunk), and the other base row never writes.
    text, other = unstopped[3]["reply"], unstopped[1]["reply"]
    windows = (text[i : i + 8] for i in range(len(text) // 2, len(text) - 8))
    stop = next(w for w in windows if w not in text[: len(text) // 2] and w not in other and w.strip() == w)
    rows_computed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows_computed.append(len(i[0])))
    try:
        replies = generate_replies(model, tokenizer, prompts, greedy, adapter_names=adapters, stop_strings=[stop])
    finally:
        hook.remove()
    one_call = one_generate_call(model, tokenizer, prompts, greedy, adapters, [stop])
    assert replies == one_call
    assert [r["reply"] for r in replies[::2]] == ["Yes.", "Yes."] and all(r["stopped"] for r in replies[::2])
    cut = replies[3]["reply"]  # ends with the token that completed the stop string
    assert stop in cut and stop not in cut[: -len(stop)] and text.startswith(cut) and not replies[3]["stopped"]
    assert replies[1]["reply"] == unstopped[1]["reply"] and unstopped[1]["new_tokens"] == greedy.max_new_tokens
    # The first chunk (the prompts, then a token at a time) computes all four rows; then only the two base rows,
    # then the one that has not met the stop string.
    assert rows_computed[:DECODE_CHUNK_TOKENS] == [4] * DECODE_CHUNK_TOKENS
    assert rows_computed[DECODE_CHUNK_TOKENS] == 2 and set(rows_computed[DECODE_CHUNK_TOKENS:]) == {2, 1}


def one_generate_call(model, tokenizer, prompts, gen_args, adapters, stop_strings) -> list[dict]:
    """The replies of one transformers generate() call over every row, cut as generation_utils cuts them."""
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(
            **batch,
            **gen_args.generate_kwargs(),
            adapter_names=adapters,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    replies = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        ended = tokenizer.eos_token_id in row
        reply = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if ended else row, skip_special_tokens=True)
        replies.append({"reply": reply.strip(), "stopped": ended and not any(s in reply for s in stop_strings)})
    return replies

"""Generation on CPU: 4-bit weights dequantized once decode what the 4-bit layers decode, and batched generation
that lets finished rows leave gives the tokens of one generate() call."""

import json

import pytest
import torch

import scoring
from adapter_utils import load_chat_model
from config import GenerationArguments, QuantizationArguments
from generation_utils import DECODE_CHUNK_TOKENS, generate_replies
from quantization_utils import dequantize_decision, linear_4bit_layers
from workarounds import keep_4bit_weights_trainable_on_cpu

FLOAT32 = QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype="float32")
GiB = 2**30


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_dequantized_weights_decode_and_score_what_the_4bit_layers_do(tiny_cpu_run):
    _, out, _ = tiny_cpu_run
    four_bit, tokenizer = load_chat_model(out, quant_args=QuantizationArguments(dequantize_on_cpu="no"))
    keep_4bit_weights_trainable_on_cpu(four_bit)  # bitsandbytes' own matmul, which dequantizes at every forward
    dequantized, _ = load_chat_model(out, quant_args=QuantizationArguments(dequantize_on_cpu="yes"))
    assert list(linear_4bit_layers(four_bit)) and not list(linear_4bit_layers(dequantized))
    prompts = [user(q) for q in json.loads((out / "eval.json").read_text())["prompts"]]
    ids = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    greedy = GenerationArguments(max_new_tokens=2 * DECODE_CHUNK_TOKENS, temperature=0)
    for side in ("__base__", "default"):  # the adapter still switches off and on
        with scoring.running(four_bit, side), scoring.running(dequantized, side), torch.inference_mode():
            assert torch.equal(four_bit(ids).logits, dequantized(ids).logits)
            replies = generate_replies(four_bit, tokenizer, prompts, greedy)
            assert generate_replies(dequantized, tokenizer, prompts, greedy) == replies
    tuned = [r["reply"] for r in replies]
    with scoring.running(dequantized, "__base__"):
        assert [r["reply"] for r in generate_replies(dequantized, tokenizer, prompts, greedy)] != tuned


@pytest.mark.parametrize(
    ("setting", "added", "available", "fused_kernel", "expected"),
    [
        ("auto", 1 * GiB, 24 * GiB, False, True),
        ("auto", 11 * GiB, 16 * GiB, False, False),  # Phi-2 in float32 on a 16 GB laptop: stays 4-bit
        ("auto", 1 * GiB, 24 * GiB, True, False),  # bitsandbytes' fused bf16 CPU kernel is faster at one row
        ("yes", 11 * GiB, 16 * GiB, True, True),
        ("no", 1 * GiB, 24 * GiB, False, False),
    ],
)
def test_when_the_weights_are_dequantized(setting, added, available, fused_kernel, expected):
    assert dequantize_decision(setting, added, available, fused_kernel) is expected


def test_finished_rows_leave_the_batch_and_the_tokens_are_those_of_one_generate_call(yes_adapter):
    """Tuned rows answer "Yes." and end; base rows (a random model) run on; one base row ends at a stop string in
    its second chunk. Rows that ended are no longer computed, and every reply is the one a single generate() call
    over all rows gives."""
    model, tokenizer = load_chat_model(yes_adapter, quant_args=FLOAT32)
    prompts = [user("Is it sunny?"), user("Tell me about the sea."), user("Do cats purr?"), user("Name a colour.")]
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

"""inference.py on the tiny model: one answer, batch, a terminal chat, a merged standalone model, fast --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import inference
from adapter_utils import load_chat_model
from chat_template import PORTABLE_CHAT_TEMPLATE
from config import GenerationArguments, QuantizationArguments
from generation_utils import (
    generate_reply,
    prompt_length,
)

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationArguments(max_new_tokens=6, temperature=0)
FLOAT32 = QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype="float32")


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "inference.py", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_help_parses_without_torch_or_transformers():
    # --help must answer at once: nothing heavy may be imported before the arguments are parsed.
    code = (
        "import sys, inference\n"
        "try:\n    inference.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("[]\n")
    for flag in ("--max-new-tokens", "--max_new_tokens", "--top-p", "--top-k", "--repetition-penalty", "--seed"):
        assert flag in result.stdout
    for flag in ("--chat", "--input", "--output", "--merge-to", "--no-adapter", "--adapter", "--base"):
        assert flag in result.stdout


def test_modes_are_exclusive_and_explained(capsys):
    for args, message in (
        ([], "nothing to do"),
        (["Hello", "--chat"], "choose one of a prompt / --chat"),
        (["--input", "prompts.jsonl"], "--input needs --output"),
        (["--merge-to", "out", "--no-adapter"], "drop --no-adapter"),
        (["Hello", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["Hello", "--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            inference.parse_args(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_one_shot_answer_streams_only_the_reply_and_stops_at_eos(yes_adapter):
    # The default path a user takes: 4-bit base + adapter, from the adapter folder.
    result = run_cli(
        "Is the grass green?", "--adapter", str(yes_adapter), "--temperature", "0", "--max-new-tokens", "20"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Yes.\n"

    # Without EOS as a stop, the same greedy generation runs on to the budget: the CLI stopped at the first EOS.
    model, tokenizer = load_chat_model(yes_adapter)
    inputs = tokenizer.apply_chat_template(
        [user("Is the grass green?")], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    unused_id = len(tokenizer) + 1  # a stop token the model can never produce
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=unused_id, pad_token_id=0)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    first_eos = new.index(tokenizer.eos_token_id)
    assert tokenizer.decode(new[:first_eos]).strip() == "Yes." and len(new) == 20


@pytest.mark.slow
def test_batch_mode_writes_one_answer_per_prompt_in_order(tiny_phi, base_model, tmp_path):
    model, tokenizer = base_model
    rows = [
        {"prompt": "Hi", "id": 1},
        {"prompt": "Tell me about France", "id": 2},
        {"messages": [user("Can you help me?"), assistant("Sure."), user("Name a colour")], "id": 3},
        {"prompt": "A story about a dragon", "id": 4},
        {"prompt": "Explain gravity to me like I am five", "id": 5},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")  # a trailing blank line is fine
    answers = tmp_path / "answers.jsonl"
    result = run_cli(
        "--input", str(prompts), "--output", str(answers), "--no-adapter", "--base", str(tiny_phi),
        "--load_in_4bit", "false", "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [w["id"] for w in written] == [1, 2, 3, 4, 5]
    assert all(w.items() >= row.items() for w, row in zip(written, rows, strict=True))  # input fields kept
    # Batched, left-padded replies equal the replies to each prompt alone (no padding at all).
    conversations = [row.get("messages") or [user(row["prompt"])] for row in rows]
    alone = [generate_reply(model, tokenizer, c, GREEDY) for c in conversations]
    assert [w["reply"] for w in written] == alone
    assert len(set(alone)) == len(alone)  # the prompts get different replies, so the order is really checked
    assert [w["stopped"] for w in written] == [False] * 5  # a random model runs to the budget


@pytest.mark.slow
def test_chat_keeps_history_drops_old_turns_resets_and_exits(tiny_phi, base_model):
    model, tokenizer = base_model
    first = "Hello! I would like to ask you a few questions about cooking pasta at home."
    long = "What is the best way to boil water quickly for cooking pasta, and how much salt should I add?"
    short = "Why?"
    reply = [generate_reply(model, tokenizer, [user(first)], GREEDY)]
    reply.append(generate_reply(model, tokenizer, [user(long)], GREEDY))  # the first exchange left out
    reply.append(generate_reply(model, tokenizer, [user(long), assistant(reply[1]), user(short)], GREEDY))
    # A context that holds [long, reply, short] but not [first, reply, long]: the second turn drops the first.
    limit = prompt_length(tokenizer, [user(long), assistant(reply[1]), user(short)])
    assert prompt_length(tokenizer, [user(first), assistant(reply[0]), user(long)]) > limit
    assert reply[2] != generate_reply(model, tokenizer, [user(short)], GREEDY)  # the history changes the answer

    stdin = f"{first}\n{long}\n{short}\n/reset\n{first}\n/exit\nnever answered\n"
    result = run_cli(
        "--chat", "--no-adapter", "--base", str(tiny_phi), "--load_in_4bit", "false", "--temperature", "0",
        "--max-new-tokens", "6", "--max-input-tokens", str(limit), stdin=stdin,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # stdout holds only the replies, streamed (compared word by word: a random model's replies may hold newlines).
    assert result.stdout.split() == " ".join([*reply, reply[0]]).split()
    assert result.stderr.count("dropped the oldest 1 exchange(s)") == 1
    assert "(history cleared)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("asked, dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("auto", "bfloat16")])
def test_merged_model_loads_in_plain_transformers_and_matches_base_plus_adapter(
    yes_adapter, tmp_path, capsys, asked, dtype
):
    out = tmp_path / "merged"
    inference.main(["--merge-to", str(out), "--adapter", str(yes_adapter), "--merge-dtype", asked])  # auto: on CPU
    assert capsys.readouterr().err.endswith(f"wrote the merged model ({dtype}) and its tokenizer to {out}\n")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == PORTABLE_CHAT_TEMPLATE  # for serving engines that render it themselves

    # The reference: the same base, unquantized in the same dtype, with the adapter applied by peft.
    reference, _ = load_chat_model(yes_adapter, quant_args=QuantizationArguments(False, bnb_4bit_compute_dtype=dtype))
    inputs = tokenizer.apply_chat_template(
        [user("Is the grass green?"), assistant("Yes."), user("And the sea?")],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        logits = merged(**inputs).logits.float()
        expected = reference(**inputs).logits.float()
        with reference.disable_adapter():
            base_only = reference(**inputs).logits.float()
    tolerance = 1e-5 if dtype == "float32" else 0.02  # bf16 rounds W + BA once; measured: 2e-7 and 4e-3
    assert (logits - expected).abs().max().item() < tolerance
    assert (expected - base_only).abs().max().item() > 1.0  # the adapter really changes the model
    # Plain generate on the merged folder answers like the adapter and stops at EOS on its own.
    output = merged.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]).lstrip() == "Yes.<|endoftext|>"


@pytest.mark.slow
def test_merge_refuses_a_folder_that_is_not_empty(yes_adapter, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("work")
    with pytest.raises(SystemExit):
        inference.main(["--merge-to", str(tmp_path), "--adapter", str(yes_adapter)])
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "work"

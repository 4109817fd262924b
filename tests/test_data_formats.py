"""Your data as users have it (data_formats.py): each chat format of the ecosystem, gzip-compressed or not, read into
the kit's conversations with the counts of what was kept and dropped, exported by `data_utils.py --out` and read back
the same, and trained on for 2 steps of the tiny model. A system message opens the first human turn and carries no
loss."""

import gzip
import json
import math
import shutil

import pytest
import yaml

import train
from data_utils import Conversations, load_conversations, main
from training_examples import to_training_records

SYSTEM = {"role": "system", "content": "Answer in one word."}
FRANCE = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
ITALY = [{"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
GREETING = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def json_lines(records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


# Each format: the file (name, text), the conversations it holds, what the loss covers, and the log's summary line.
FORMATS = {
    "messages with a system message": (
        "chat.jsonl",
        json_lines(
            [
                {"messages": [SYSTEM, *FRANCE, *ITALY]},
                {"messages": [user("A question nobody answered")]},  # dropped: nothing to learn
                {"messages": GREETING + [user("Thanks!")]},  # the unanswered last turn is cut
            ]
        ),
        [[SYSTEM, *FRANCE, *ITALY], GREETING],
        "all",
        "3 records read as messages: kept 2 conversations, dropped 1 without an assistant reply",
    ),
    "messages with content parts": (
        "parts.jsonl",
        json_lines(
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "text", "text": "Capital of"}, {"type": "text", "text": "France?"}],
                        },
                        {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
                    ]
                },
                {"messages": GREETING},
            ]
        ),
        [[user("Capital of\nFrance?"), assistant("Paris.")], GREETING],
        "all",
        "2 records read as messages: kept 2 conversations",
    ),
    "ShareGPT": (
        "sharegpt.jsonl",
        json_lines(
            [
                {
                    "id": "sg-1",
                    "conversations": [
                        {"from": "system", "value": "Answer in one word."},
                        {"from": "human", "value": "Capital of France?"},
                        {"from": "gpt", "value": "Paris."},
                        {"from": "human", "value": "And of Italy?"},
                        {"from": "gpt", "value": "Rome."},
                    ],
                },
                {
                    "id": "sg-2",
                    "conversations": [
                        {"from": "user", "value": "Hi"},
                        {"from": "assistant", "value": "Hello! How can I help?"},
                    ],
                },
            ]
        ),
        [[SYSTEM, *FRANCE, *ITALY], GREETING],
        "all",
        "2 records read as ShareGPT: kept 2 conversations",
    ),
    "Alpaca, a gzip-compressed JSON array": (
        "alpaca_data.json.gz",
        json.dumps(
            [
                {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Capital of France?", "input": "", "output": "Paris."},
            ],
            indent=2,
        ),
        [[user("Add the numbers.\n\n2 and 3"), assistant("5")], FRANCE],
        "all",
        "2 records read as Alpaca: kept 2 conversations",
    ),
    "prompt-completion": (
        "completions.jsonl",
        json_lines(
            [
                {"prompt": "Capital of France?", "completion": "Paris."},
                {"prompt": [SYSTEM, *FRANCE, ITALY[0]], "completion": [ITALY[1]]},
            ]
        ),
        [FRANCE, [SYSTEM, *FRANCE, *ITALY]],
        "last",
        "2 records read as prompt-completion: kept 2 examples",
    ),
    "text lines, gzip-compressed": (
        "chat.txt.gz",
        "### Human: Capital of France? ### Assistant: Paris. ### Human: And of Italy? ### Assistant: Rome.\n\n"
        "### Human: Hi ### Assistant: Hello! How can I help?\n",
        [[*FRANCE, *ITALY], GREETING],
        "all",
        "2 records read as text: kept 2 conversations",
    ),
}

PAIRS = json_lines(
    [
        {"prompt": [SYSTEM, FRANCE[0]], "chosen": [FRANCE[1]], "rejected": [assistant("Lyon.")]},
        {"chosen": [*FRANCE, *ITALY], "rejected": [*FRANCE, ITALY[0], assistant("Milan.")]},  # the prompt implicit
        {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "What?"},
    ]
)
EXPECTED_PAIRS = [
    ([SYSTEM, FRANCE[0]], FRANCE[1], assistant("Lyon.")),
    ([*FRANCE, ITALY[0]], ITALY[1], assistant("Milan.")),
    ([user("Hi")], GREETING[1], assistant("What?")),
]


def write(path, text: str):
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def conversations_of(result: Conversations) -> list[list[dict]]:
    return [e["messages"] for e in result.examples]


def pairs_of(result: Conversations) -> list[tuple]:
    return [(e["prompt"], *e["chosen"], *e["rejected"]) for e in result.examples]


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_reads_with_its_counts_and_round_trips_through_the_export(name, tmp_path, caplog):
    filename, text, expected, loss_on, summary = FORMATS[name]
    path = write(tmp_path / filename, text)
    with caplog.at_level("INFO"):
        result = load_conversations(str(path))
    assert conversations_of(result) == expected
    assert result.loss_on == loss_on
    assert f"{path}: {summary}" in caplog.messages  # one line says which format was read, kept and dropped
    out = tmp_path / "export.jsonl"
    main(["--input", str(path), "--out", str(out)])
    again = load_conversations(str(out))
    assert conversations_of(again) == expected and again.loss_on == loss_on
    assert [e["id"] for e in again.examples] == [e["id"] for e in result.examples]


def test_loss_on_the_last_reply_round_trips_through_the_export(sample_path, tmp_path):
    replies = load_conversations(str(sample_path), policy="replies")
    out = tmp_path / "replies.jsonl"
    main(["--input", str(sample_path), "--policy", "replies", "--out", str(out)])
    again = load_conversations(str(out))  # prompt-completion lines: the last reply trained alone, as before
    assert again.loss_on == replies.loss_on == "last"
    assert conversations_of(again) == conversations_of(replies)


def test_preference_pairs_read_and_round_trip_through_the_export(tmp_path):
    path = write(tmp_path / "pairs.jsonl", PAIRS)
    pairs = load_conversations(str(path), policy="best_vs_rest")
    assert pairs.loss_on == "pairs" and pairs_of(pairs) == EXPECTED_PAIRS
    assert pairs.summary() == "3 records read as preference pairs: kept 3 preference pairs"
    out = tmp_path / "export.jsonl"
    main(["--input", str(path), "--out", str(out), "--policy", "best_vs_rest"])
    assert pairs_of(load_conversations(str(out), policy="all_pairs")) == EXPECTED_PAIRS
    # For SFT (and the held-out loss of a DPO run) a pair is its prompt with the chosen reply, loss on that reply.
    chosen = load_conversations(str(path))
    assert chosen.loss_on == "last"
    assert conversations_of(chosen) == [prompt + [reply] for prompt, reply, _ in EXPECTED_PAIRS]


def test_gzip_is_recognised_by_its_bytes_and_the_hub_trees_export_reads_as_the_plain_one(sample_path, tmp_path):
    hub_name = tmp_path / "2023-04-12_oasst_ready.trees.jsonl.gz"
    hub_name.write_bytes(gzip.compress(sample_path.read_bytes()))
    no_gz_name = tmp_path / "downloaded.jsonl"  # gzip data under a plain name
    shutil.copy(hub_name, no_gz_name)
    plain = load_conversations(str(sample_path), policy="replies")
    for path in (hub_name, no_gz_name):
        assert load_conversations(str(path), policy="replies").examples == plain.examples


# ---------------------------------------------------------------------------------------------------------------
# Training on each format


def two_steps(tiny_phi, data, out, *extra):
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--output_dir", str(out), "--eval_split", ""]
    args += [
        "--max_steps",
        "2",
        "--save_steps",
        "1000",
        "--logging_steps",
        "1",
        "--lora_r",
        "4",
        "--report_to",
        "none",
    ]
    return train.main([*args, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", [*FORMATS, "preference pairs (DPO)"])
def test_two_training_steps_on_each_format(name, tiny_phi, tmp_path):
    if name in FORMATS:
        filename, text, *_ = FORMATS[name]
        extra = ["--final_report", "false"]
    else:
        filename, text, extra = "pairs.jsonl", PAIRS, ["--final_report", "false", "--method", "dpo"]
    data = write(tmp_path / filename, text)
    out = tmp_path / "model"
    trainer, result = two_steps(tiny_phi, data, out, *extra)
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    assert (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "run_config.yaml").read_text())["dataset"] == str(data)


def test_a_system_message_carries_no_loss(tiny_phi, tokenizer, tmp_path):
    from datasets import Dataset

    from adapter_utils import build_lora_config
    from config import LoraArguments, ModelArguments, QuantizationArguments
    from model_utils import load_model
    from train_settings import TrainingConfig
    from trainer_setup import build_trainer

    data = write(tmp_path / "chat.jsonl", json_lines([{"messages": [SYSTEM, *FRANCE, *ITALY]}]))
    records = to_training_records(load_conversations(str(data)))
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(load_in_4bit=False))
    args = TrainingConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, packing=False)
    trainer = build_trainer(
        model,
        tokenizer,
        args,
        Dataset.from_list(records),
        peft_config=build_lora_config(LoraArguments(lora_r=4), "phi"),
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # The template's text: the system message opens the first human turn, then a blank line and the question.
    first_turn = ids("### Human: Answer in one word.\n\nCapital of France? ### Assistant:")
    paris = ids(" Paris.") + [tokenizer.eos_token_id]
    second_turn = ids(" ### Human: And of Italy? ### Assistant:")
    rome = ids(" Rome.") + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == first_turn + paris + second_turn + rome
    assert batch["labels"][0].tolist() == [-100] * len(first_turn) + paris + [-100] * len(second_turn) + rome


@pytest.mark.slow
def test_a_report_on_conversations_with_a_system_message(tiny_phi, tmp_path):
    chats = [
        {"id": f"chat-{n}", "messages": [SYSTEM, user(f"Question {n}?"), assistant(f"Answer {n}.")]} for n in range(4)
    ]
    data = write(tmp_path / "chat.jsonl", json_lines(chats))
    out = tmp_path / "model"
    two_steps(tiny_phi, data, out, "--eval_fraction", "0.5", "--report_prompts", "2", "--report_max_new_tokens", "4")
    report = json.loads((out / "eval.json").read_text())
    held_out = sorted(report["heldout_ids"])
    assert len(held_out) == 2
    # The held-out openings are the system message with the first question (the system message alone, as before,
    # is no prompt: the template refuses it); the report shows the question.
    assert sorted(report["prompts"]) == [f"Question {name[-1]}?" for name in held_out]

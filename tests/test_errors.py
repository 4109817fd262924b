"""A user's mistake costs one clear line: "error: ..." on stderr, exit code 2, no traceback, and nothing written.

Each case runs an entry point's main() (the CLI, without the seconds of a fresh interpreter) in an empty working
folder, and checks the exact message and that the folder, output folder included, is unchanged. Every check here
fails before the model loads. test_config.py runs train.py as a subprocess for an unknown flag, and the empty prompt
below runs inference.py as one, to see the interpreter itself print no traceback.
"""

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
import train
from config import ModelArguments, QuantizationArguments
from train_settings import parse_train_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def chat_file(workdir):
    path = workdir / "chat.jsonl"
    exchange = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path.write_text(json.dumps(exchange) + "\n", encoding="utf-8")
    return path


def error_line(main, args: list[str], workdir: Path, capsys, snapshot) -> str:
    """Run main(args); check exit code 2, one "error: " line on stderr, and no change under workdir."""
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(workdir) == before
    return err.removeprefix("error: ").rstrip("\n")


def train_error(args: list[str], workdir, capsys, snapshot, tiny_phi) -> str:
    return error_line(train.main, ["--model", str(tiny_phi), "--output_dir", "out", *args], workdir, capsys, snapshot)


def oasst_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Input data


def test_input_file_missing(workdir, capsys, snapshot, tiny_phi):
    message = train_error(["--dataset", "missing.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == "data file not found: missing.jsonl (pass a local file, or 'hub' for OpenAssistant/oasst1)."


def test_malformed_jsonl_line_gives_its_number(workdir, chat_file, capsys, snapshot, tiny_phi):
    chat_file.write_text(chat_file.read_text() + '{"messages": [\n', encoding="utf-8")
    message = train_error(["--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message.startswith("chat.jsonl:2: not valid JSON (")


def test_non_utf8_file(workdir, capsys, snapshot, tiny_phi):
    (workdir / "latin1.jsonl").write_bytes('{"text": "### Human: Grüß dich ### Assistant: Hallo"}\n'.encode("latin-1"))
    message = train_error(["--dataset", "latin1.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == "latin1.jsonl is not UTF-8 text; convert it (e.g. iconv -t utf-8) and try again."


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "trees.jsonl.gz",
            gzip.compress(b'{"message_tree_id": "t", "prompt": {}}\n')[:-8],  # cut short
            "trees.jsonl.gz: the gzip data is damaged (Compressed file ended before the end-of-stream marker was "
            "reached); download or compress it again.",
        ),
        (
            "latin1.jsonl.gz",
            gzip.compress('{"text": "### Human: Grüß dich ### Assistant: Hallo"}\n'.encode("latin-1")),
            "latin1.jsonl.gz is not UTF-8 text; convert it (e.g. iconv -t utf-8) and try again.",
        ),
        (
            "chat.jsonl.zst",
            b"\x28\xb5\x2f\xfd\x00\x00",
            "chat.jsonl.zst is zstd-compressed: decompress it first (zstd -d); gzip-compressed files are read as "
            "they are.",
        ),
    ],
    ids=["gzip-cut-short", "gzip-not-utf8", "zstd"],
)
def test_compressed_files_that_cannot_be_read(workdir, capsys, snapshot, tiny_phi, name, content, expected):
    (workdir / name).write_bytes(content)
    assert train_error(["--dataset", name], workdir, capsys, snapshot, tiny_phi) == expected


def test_a_record_in_no_known_format_lists_the_formats(workdir, capsys, snapshot, tiny_phi):
    (workdir / "chat.jsonl").write_text('{"question": "Hi", "answer": "Hello!"}\n', encoding="utf-8")
    message = train_error(["--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "chat.jsonl: example 1 (keys question, answer) is in no format this kit reads; one record per line, in one "
        'of: oasst1 trees {"message_tree_id": ..., "prompt": {"message_id": ..., "text": ..., "replies": [...]}}; '
        'oasst1 rows {"message_id": ..., "parent_id": ..., "role": "prompter", "text": ...}; preference pairs '
        '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}; prompt-completion {"prompt": "Hi", '
        '"completion": "Hello!"}; messages {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
        '"content": "Hello!"}]}; ShareGPT {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", '
        '"value": "Hello!"}]}; Alpaca {"instruction": "Greet me.", "input": "", "output": "Hello!"}; text {"text": '
        '"### Human: Hi ### Assistant: Hello!"}.'
    )


@pytest.mark.parametrize(
    "records, expected",
    [
        (
            [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]}]}],
            "example 1: message 1 has a content part of type 'image_url': this model reads text only; remove it, or "
            "the example.",
        ),
        (
            [{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]}],
            "example 1: message 2 is a system message: only the first message may be one.",
        ),
        (
            [{"messages": [{"role": "user", "content": "Hi"}]}, {"instruction": "Hi", "output": "Hello!"}],
            'example 2: expected a messages record like the first one, {"messages": [{"role": "user", "content": '
            '"Hi"}, {"role": "assistant", "content": "Hello!"}]}.',
        ),
        (
            [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]}],
            "example 1: message 2: role 'function_call' is not supported (user and assistant turns, and a system "
            "message first; ShareGPT's human, gpt and system).",
        ),
        (
            [
                {
                    "prompt": "Hi",
                    "completion": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}],
                }
            ],
            'example 1: "completion" must be one assistant message (or a string).',
        ),
        (
            [{"chosen": [{"role": "user", "content": "Hi"}], "rejected": [{"role": "user", "content": "Yo"}]}],
            'example 1: without a "prompt", "chosen" and "rejected" must be two conversations that differ only in '
            "their last, assistant, message.",
        ),
    ],
    ids=["image-part", "late-system-message", "format-changes", "sharegpt-tool-role", "two-completions", "no-prompt"],
)
def test_records_that_cannot_be_trained_on_name_the_example(workdir, capsys, snapshot, tiny_phi, records, expected):
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert train_error(["--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi) == f"chat.jsonl: {expected}"


def test_rows_missing_required_columns(workdir, capsys, snapshot, tiny_phi):
    rows = [
        {"message_id": "a", "parent_id": None, "text": "Hi", "role": "prompter"},
        {"message_id": "b", "parent_id": "a", "text": "Hello"},  # no role
    ]
    oasst_rows(workdir / "rows.jsonl", rows)
    message = train_error(["--dataset", "rows.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == "rows.jsonl: row 2 lacks the oasst1 column 'role'."


def test_own_conversations_with_a_wrong_role(workdir, capsys, snapshot, tiny_phi):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}]}
    (workdir / "chat.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    message = train_error(["--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "chat.jsonl: example 1: message 2: role 'tool' is not supported (user and assistant turns, and a system "
        "message first; ShareGPT's human, gpt and system)."
    )


def test_no_examples_left_after_filters_says_which_filter_removed_what(workdir, capsys, snapshot, tiny_phi):
    rows = [
        {"message_id": "a", "parent_id": None, "text": "Hi", "role": "prompter", "lang": "en"},
        {"message_id": "b", "parent_id": "a", "text": "Go away", "role": "assistant", "lang": "en", "deleted": True},
        {
            "message_id": "c",
            "parent_id": "a",
            "text": "Meh",
            "role": "assistant",
            "lang": "en",
            "review_result": False,
        },
        {"message_id": "d", "parent_id": "a", "text": "Hallo", "role": "assistant", "lang": "de"},
        {"message_id": "e", "parent_id": "x", "text": "Lost", "role": "assistant", "lang": "en"},
    ]
    oasst_rows(workdir / "rows.jsonl", rows)
    message = train_error(["--dataset", "rows.jsonl", "--langs", "en"], workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "no examples left from rows.jsonl: 5 messages: removed 1 deleted, 1 rejected in review, 1 in other "
        "languages, 1 orphaned (parent missing or removed); kept 1 -> 0 examples."
    )


def test_unknown_language_code(workdir, capsys, snapshot, tiny_phi, sample_path):
    message = train_error(["--dataset", str(sample_path), "--langs", "english"], workdir, capsys, snapshot, tiny_phi)
    assert message == f"{sample_path}: no message has the language code english (--langs); the data has en (1167)."


def test_unknown_policy(workdir, chat_file, capsys, snapshot, tiny_phi):
    message = train_error(["--dataset", "chat.jsonl", "--policy", "longest"], workdir, capsys, snapshot, tiny_phi)
    choices = "'auto', 'best', 'replies', 'best_vs_rest', 'all_pairs'"
    assert message == f"argument --policy: invalid choice: 'longest' (choose from {choices}) (see --help)"


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_yaml_unknown_key(workdir, chat_file, capsys, snapshot, tiny_phi):
    (workdir / "run.yaml").write_text("learning_rat: 0.001\n")
    message = train_error(["--config", "run.yaml", "--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == "run.yaml: unknown setting 'learning_rat' (did you mean learning_rate?)."


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("lora_r: 8.5", "lora_r must be an integer, got 8.5 (float)."),
        ("learning_rate: fast", "learning_rate must be a number, got 'fast' (str)."),
        ("load_in_4bit: maybe", "load_in_4bit must be true or false, got 'maybe' (str)."),
        ("model_revision: 1234567", "model_revision must be text (quote it) or null, got 1234567 (int)."),
    ],
)
def test_yaml_wrong_type(line, expected, workdir, chat_file, capsys, snapshot, tiny_phi):
    (workdir / "run.yaml").write_text(line + "\n")
    message = train_error(["--config", "run.yaml", "--dataset", "chat.jsonl"], workdir, capsys, snapshot, tiny_phi)
    assert message == f"run.yaml: {expected}"


def test_yaml_numbers_written_like_2e_4_are_numbers():
    # PyYAML reads 2e-4 (no dot) as a string; argparse converts it, so the type check must let it through.
    *_, training = parse_train_args(["--learning_rate", "1", "--config", str(ROOT / "configs" / "tiny_cpu.yaml")])
    assert training.learning_rate == 1.0


def test_max_length_too_short_for_the_template(workdir, chat_file, capsys, snapshot, tiny_phi):
    message = train_error(["--dataset", "chat.jsonl", "--max_length", "6"], workdir, capsys, snapshot, tiny_phi)
    assert message.startswith("--max_length 6 is too short for the conversation template: an empty exchange already")


def test_base_model_not_reachable(workdir, chat_file, capsys, snapshot):
    args = ["--model", "nobody/no-such-model", "--dataset", "chat.jsonl", "--output_dir", "out"]
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message == (
        "cannot download nobody/no-such-model from the Hugging Face Hub (no network?). Download it where there is one "
        "(huggingface-cli download nobody/no-such-model --local-dir DIR), or use a copy you have, and pass its "
        "folder: --model DIR (train.py) or --base DIR (inference.py)."
    )


def test_local_model_folder_missing(workdir, chat_file, capsys, snapshot):
    args = ["--model", "./models/phi-2", "--dataset", "chat.jsonl", "--output_dir", "out"]
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message == "no model folder at ./models/phi-2: pass a folder saved with save_pretrained, or a Hub id."


def test_pickled_model_weights_are_refused(workdir, chat_file, capsys, snapshot, tiny_phi):
    (workdir / "old-model").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (workdir / "old-model" / name).write_bytes((tiny_phi / name).read_bytes())
    (workdir / "old-model" / "pytorch_model.bin").write_bytes(b"a pickle would run code when loaded")
    args = ["--model", "old-model", "--dataset", "chat.jsonl", "--output_dir", "out"]
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message.startswith("old-model holds only pickled weights (*.bin), which are never loaded")


def test_output_folder_that_cannot_be_written(workdir, chat_file, capsys, snapshot, tiny_phi):
    # Portable, and true even for root: nothing can be created below a regular file.
    (workdir / "notes.txt").write_text("a file, not a folder")
    args = ["--dataset", "chat.jsonl", "--output_dir", "notes.txt/model"]
    message = error_line(train.main, ["--model", str(tiny_phi), *args], workdir, capsys, snapshot)
    assert message == f"cannot write to notes.txt/model: {workdir / 'notes.txt'} is a file, not a folder."


def test_resume_and_overwrite_together(workdir, chat_file, capsys, snapshot, tiny_phi):
    message = train_error(["--dataset", "chat.jsonl", "--resume", "--overwrite"], workdir, capsys, snapshot, tiny_phi)
    assert message == "--resume continues the run in out and --overwrite replaces it: pass only one."


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallbacks on a machine without CUDA")
def test_cuda_only_training_options_fall_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        *_, training = parse_train_args(["--optim", "paged_adamw_8bit", "--fp16", "true"])
    assert training.optim == "adamw_torch" and not training.fp16
    assert "--optim paged_adamw_8bit needs CUDA: using adamw_torch on CPU." in caplog.messages
    assert "No CUDA GPU: mixed precision is off, training in float32 on CPU." in caplog.messages


@pytest.mark.parametrize(
    "requested, kind, capability, chosen, warning",
    [
        ("flash_attention_2", "cuda", (9, 0), "flash_attention_2", None),
        ("flash_attention_2", "cuda", (8, 0), "flash_attention_2", None),  # A100: the first that has it
        (
            "flash_attention_2",
            "cuda",
            (7, 5),
            "sdpa",
            "--attn_implementation flash_attention_2 needs compute capability 8.0 or newer (this GPU has 7.5): using "
            "sdpa.",
        ),
        (
            "flash_attention_2",
            "cpu",
            None,
            "sdpa",
            "--attn_implementation flash_attention_2 needs a CUDA GPU: using sdpa on CPU.",
        ),
        ("sdpa", "cuda", (7, 5), "sdpa", None),
        ("eager", "cpu", None, "eager", None),
    ],
)
def test_flash_attention_falls_back_to_sdpa_where_it_cannot_run(requested, kind, capability, chosen, warning):
    from model_utils import device_attention

    assert device_attention(requested, kind, capability) == (chosen, warning)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_flash_attention_on_cpu_falls_back_to_sdpa(tiny_phi, caplog):
    from model_utils import load_model

    model_args = ModelArguments(model_name_or_path=str(tiny_phi), attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING):
        model = load_model(model_args, QuantizationArguments(load_in_4bit=False))
    assert model.config._attn_implementation == "sdpa"
    assert "--attn_implementation flash_attention_2 needs a CUDA GPU: using sdpa on CPU." in caplog.messages


# ---------------------------------------------------------------------------------------------------------------
# Inference: the prompt and the adapter


@pytest.fixture(scope="module")
def adapter(tiny_phi, tmp_path_factory):
    """A real (untrained) LoRA adapter for the tiny model, saved as train.py saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "model"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_phi), LoraConfig(r=2, target_modules=["fc1"]))
    model.save_pretrained(folder)
    return folder


def test_empty_prompt(workdir, snapshot):
    before = snapshot(workdir)
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), "   ", "--adapter", "model"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.splitlines()[-1]
        == 'error: the prompt is empty: pass some text, e.g. python inference.py "Hello".'
    )
    assert snapshot(workdir) == before


def test_adapter_folder_missing(workdir, capsys, snapshot):
    message = error_line(inference.main, ["Hi", "--adapter", "no-such-run"], workdir, capsys, snapshot)
    assert message == "no adapter at no-such-run: train one with `python train.py`, or pass --adapter DIR."


def test_folder_that_is_not_an_adapter(workdir, capsys, snapshot, tiny_phi):
    (workdir / "run").mkdir()
    (workdir / "run" / "checkpoint-3").mkdir()  # a save cut short: not an adapter either
    message = error_line(inference.main, ["Hi", "--adapter", "run"], workdir, capsys, snapshot)
    assert message == "run is not a LoRA adapter: it holds no adapter_config.json and no complete checkpoint-N folder."


def test_pickled_adapter_is_refused(workdir, adapter, capsys, snapshot):
    (workdir / "old").mkdir()
    (workdir / "old" / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (workdir / "old" / "adapter_model.bin").write_bytes(b"a pickle would run code when loaded")
    message = error_line(inference.main, ["Hi", "--adapter", "old"], workdir, capsys, snapshot)
    assert message.startswith("old holds a pickled adapter_model.bin, which is never loaded (unpickling can run code)")


def test_adapter_trained_on_a_different_base(workdir, adapter, capsys, snapshot, tiny_phi):
    args = ["Hi", "--adapter", str(adapter), "--base", "microsoft/phi-2"]
    message = error_line(inference.main, args, workdir, capsys, snapshot)
    assert message == (
        f"the adapter in {adapter} was trained on {tiny_phi}, not microsoft/phi-2: leave --base out to use "
        f"{tiny_phi} (if microsoft/phi-2 is a copy of it, set base_model_name_or_path in adapter_config.json)."
    )


def test_an_unreachable_hub_fails_at_once_with_one_line(workdir, chat_file, capsys, snapshot, monkeypatch):
    # As on a machine without a network (the tests otherwise run with HF_HUB_OFFLINE=1): one probe, then the error,
    # instead of huggingface_hub's retries (about 45 s of warnings).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    args = ["--model", "nobody/not-cached-anywhere", "--dataset", "chat.jsonl", "--output_dir", "out"]
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message.startswith("cannot download nobody/not-cached-anywhere from the Hugging Face Hub (no network?).")


# ---------------------------------------------------------------------------------------------------------------
# Preference tuning


def test_dpo_on_conversations_is_one_line(workdir, capsys, snapshot, tiny_phi, sample_path):
    args = ["--dataset", str(sample_path), "--method", "dpo", "--policy", "best"]
    message = train_error(args, workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "--method dpo trains on preference pairs: best_vs_rest or all_pairs (--policy auto picks the method's "
        "default)."
    )


def test_dpo_on_your_own_conversations_is_one_line(workdir, chat_file, capsys, snapshot, tiny_phi):
    message = train_error(["--dataset", "chat.jsonl", "--method", "orpo"], workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "chat.jsonl: preference pairs (--policy best_vs_rest) come from oasst1's ranked replies or from "
        "chosen/rejected pairs; this file holds messages records, which carry no ranks."
    )


@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_init_adapter_without_dpo_is_one_line(method, workdir, capsys, snapshot, tiny_phi):
    message = train_error(["--method", method, "--init_adapter", "model"], workdir, capsys, snapshot, tiny_phi)
    assert message == (
        "--init_adapter starts --method dpo from an SFT adapter; ORPO trains in one stage from the base, and an SFT "
        "run continues with --resume."
    )


def test_missing_init_adapter_is_one_line(workdir, capsys, snapshot, tiny_phi, sample_path):
    args = ["--dataset", str(sample_path), "--eval_split", "", "--method", "dpo", "--init_adapter", "sft-model"]
    message = train_error(args, workdir, capsys, snapshot, tiny_phi)
    assert message == "--init_adapter sft-model: no such folder; pass the output folder of an SFT run."

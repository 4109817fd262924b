"""What the libraries would raise on a user's damaged or wrong input ends in one line too: exit code 2, `error: ...`,
nothing written.

Damaged adapters and model folders (cut-short weights, config files that are not JSON objects, settings peft refuses,
an adapter made for another model), an adapter passed as a model, LoRA target names the model does not have, a port
the page cannot listen on, YAML that is not a mapping of settings, and the encodings that are valid (a UTF-8
byte-order mark, Windows line endings) in configs and batch prompts. The messy data itself: test_messy_data.py.
"""

import json
import shutil
import socket
from pathlib import Path

import pytest

import app
import inference
import report
import train
from train_settings import parse_train_args


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


@pytest.fixture(scope="module")
def adapter(tiny_phi, tmp_path_factory) -> Path:
    """A real (untrained) LoRA adapter for the tiny model, as peft saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "model"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_phi), LoraConfig(r=2, target_modules=["fc1"]))
    model.save_pretrained(folder)
    return folder


def error_line(main, args: list[str], workdir: Path, capsys, snapshot) -> str:
    """Run main(args); check exit code 2, one "error: " line on stderr, and no change under workdir. Errors found
    once the base model is loaded come after transformers' "Loading weights" progress bar, and nothing else."""
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    *progress, last = capsys.readouterr().err.rstrip("\n").split("\n")
    assert last.startswith("error: ") and all(line.startswith("\rLoading weights") for line in progress), progress
    assert snapshot(workdir) == before
    return last.removeprefix("error: ")


def copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def ask(folder: Path, *extra: str) -> list[str]:
    """inference.py's arguments for one prompt, on an unquantized base (faster on CPU)."""
    return ["Hi", "--adapter", str(folder), "--load_in_4bit", "false", *extra]


# ---------------------------------------------------------------------------------------------------------------
# Adapters


def test_a_cut_short_adapter_file(workdir, adapter, capsys, snapshot):
    damaged = copy(adapter, workdir / "damaged")
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = error_line(inference.main, ask(damaged), workdir, capsys, snapshot)
    assert message == (
        f"{weights} is damaged (Error while deserializing header: incomplete metadata, file not fully covered): copy "
        "the adapter again, or use another checkpoint."
    )


def test_an_adapter_file_that_is_not_safetensors(workdir, adapter, capsys, snapshot):
    damaged = copy(adapter, workdir / "damaged")
    (damaged / "adapter_model.safetensors").write_bytes(b"<html>404 Not Found</html>")
    message = error_line(inference.main, ask(damaged), workdir, capsys, snapshot)
    assert message.startswith(f"{damaged / 'adapter_model.safetensors'} is damaged (Error while deserializing header")


def test_a_damaged_checkpoint_adapter_is_refused_too(workdir, adapter, capsys, snapshot):
    run = workdir / "run"
    checkpoint = copy(adapter, run / "checkpoint-2")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    message = error_line(inference.main, ask(run), workdir, capsys, snapshot)
    assert message.startswith(f"{checkpoint / 'adapter_model.safetensors'} is damaged (")


def edit_adapter_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_an_adapter_config_of_an_unknown_kind(workdir, adapter, capsys, snapshot):
    folder = edit_adapter_config(copy(adapter, workdir / "odd"), peft_type="NOT_LORA")
    message = error_line(inference.main, ask(folder), workdir, capsys, snapshot)
    assert message == (
        f"peft cannot read {folder / 'adapter_config.json'} (KeyError: 'NOT_LORA'): it is damaged or not from peft; "
        "use another checkpoint, or train again."
    )


def test_an_adapter_config_with_a_setting_peft_refuses(workdir, adapter, capsys, snapshot, tiny_phi):
    folder = edit_adapter_config(copy(adapter, workdir / "odd"), r="sixteen")
    message = error_line(inference.main, ask(folder), workdir, capsys, snapshot)
    assert message == (
        f"cannot load the adapter in {folder} on {tiny_phi} (TypeError: '<=' not supported between instances of "
        "'str' and 'int'): its adapter_config.json is damaged or it was made for another model; use another "
        "checkpoint, or train again."
    )


def test_an_adapter_for_layers_the_base_does_not_have(workdir, adapter, capsys, snapshot, tiny_phi):
    folder = edit_adapter_config(copy(adapter, workdir / "odd"), target_modules=["c_attn"])
    message = error_line(inference.main, ask(folder), workdir, capsys, snapshot)
    assert message.startswith(
        f"cannot load the adapter in {folder} on {tiny_phi} (NoMatchingPeftModuleError: Target modules {{'c_attn'}} "
        "not found in the base model."
    )


def test_an_adapter_trained_on_a_model_of_another_size(workdir, capsys, snapshot, tiny_phi):
    # Named as trained on the tiny model (a copy, say) but made for one twice as wide.
    from peft import LoraConfig, get_peft_model
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig.from_pretrained(tiny_phi)
    config.hidden_size *= 2
    wide = get_peft_model(PhiForCausalLM(config), LoraConfig(r=2, target_modules=["fc1"]))
    wide.save_pretrained(workdir / "wide")
    edit_adapter_config(workdir / "wide", base_model_name_or_path=str(tiny_phi))
    message = error_line(inference.main, ask(workdir / "wide"), workdir, capsys, snapshot)
    assert message == (
        f"the adapter in {workdir / 'wide'} does not fit {tiny_phi}: its weights have other shapes (it was trained "
        "on another model); leave --base out to use the model it was trained on."
    )


def test_a_model_folder_passed_as_the_adapter(workdir, capsys, snapshot, tiny_phi):
    message = error_line(inference.main, ask(tiny_phi), workdir, capsys, snapshot)
    assert message == (
        f"{tiny_phi} is not a LoRA adapter: it holds no adapter_config.json and no complete checkpoint-N folder."
    )


# ---------------------------------------------------------------------------------------------------------------
# Base models


def train_on(model: Path, chat_file: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(chat_file), "--output_dir", "out", *extra]


def test_cut_short_model_weights(workdir, chat_file, capsys, snapshot, tiny_phi):
    model = copy(tiny_phi, workdir / "model-copy")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    message = error_line(train.main, train_on(model, chat_file), workdir, capsys, snapshot)
    assert message == (
        f"{weights} is damaged (Error while deserializing header: incomplete metadata, file not fully covered): copy "
        "the model folder again."
    )


def test_damaged_base_weights_under_an_adapter(workdir, adapter, capsys, snapshot, tiny_phi):
    model = copy(tiny_phi, workdir / "model-copy")
    (model / "model.safetensors").write_bytes(b"")
    args = ["Hi", "--no-adapter", "--base", str(model), "--load_in_4bit", "false"]
    message = error_line(inference.main, args, workdir, capsys, snapshot)
    assert message.startswith(f"{model / 'model.safetensors'} is damaged (Error while deserializing header: ")


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            "{not json",
            "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        ("[1, 2]", "is not a JSON object"),
    ],
)
def test_a_config_json_that_is_not_a_json_object(workdir, chat_file, capsys, snapshot, tiny_phi, content, expected):
    model = copy(tiny_phi, workdir / "model-copy")
    (model / "config.json").write_text(content)
    message = error_line(train.main, train_on(model, chat_file), workdir, capsys, snapshot)
    assert message == f"{model / 'config.json'} {expected}: the folder is damaged; copy it again."


def test_a_config_json_of_an_unknown_architecture(workdir, chat_file, capsys, snapshot, tiny_phi):
    model = copy(tiny_phi, workdir / "model-copy")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "not-a-model"}))
    message = error_line(train.main, train_on(model, chat_file), workdir, capsys, snapshot)
    assert message.startswith(
        f"cannot load a model from {model}: The checkpoint you are trying to load has model type `not-a-model`"
    )


def test_a_damaged_tokenizer(workdir, chat_file, capsys, snapshot, tiny_phi):
    model = copy(tiny_phi, workdir / "model-copy")
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    message = error_line(train.main, train_on(model, chat_file), workdir, capsys, snapshot)
    assert message == (
        f"cannot read the tokenizer of {model} (KeyError: 'added_tokens'): its tokenizer files are damaged; copy "
        "them again from the base model."
    )


def test_an_adapter_passed_as_the_model(workdir, adapter, chat_file, capsys, snapshot):
    message = error_line(train.main, train_on(adapter, chat_file), workdir, capsys, snapshot)
    assert message == (
        f"{adapter} holds a LoRA adapter, not a model: pass it as --adapter (inference.py, app.py) and its base "
        "model as --model or --base."
    )


# ---------------------------------------------------------------------------------------------------------------
# LoRA settings that peft would refuse, or silently half-apply


def test_a_lora_target_the_model_does_not_have(workdir, chat_file, capsys, snapshot, tiny_phi):
    # peft would adapt q_proj and skip the misspelt name without a word.
    args = train_on(tiny_phi, chat_file, "--lora_target_modules", "q_proj,v_prj", "--load_in_4bit", "false")
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message == (
        "--lora_target_modules: this model has no layer named 'v_prj'; its linear layers are dense, fc1, fc2, "
        "k_proj, q_proj, v_proj (or pass all-linear)."
    )


def test_a_lora_target_that_is_not_a_linear_layer(workdir, chat_file, capsys, snapshot, tiny_phi):
    args = train_on(tiny_phi, chat_file, "--lora_target_modules", "final_layernorm", "--load_in_4bit", "false")
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message.startswith("--lora_target_modules: 'final_layernorm' is a LayerNorm, which LoRA cannot adapt;")


def test_no_lora_target_at_all(workdir, chat_file, capsys, snapshot, tiny_phi):
    message = error_line(
        train.main, train_on(tiny_phi, chat_file, "--lora_target_modules", " , "), workdir, capsys, snapshot
    )
    assert message == "--lora_target_modules names no module: pass a comma list, all-linear or auto."


# ---------------------------------------------------------------------------------------------------------------
# The chat page's address: refused before the model loads


def test_a_port_in_use(workdir, capsys, snapshot):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = error_line(app.main, ["--port", str(port)], workdir, capsys, snapshot)
    assert message == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port, or a --host of this "
        "machine (127.0.0.1, or 0.0.0.0 for every network)."
    )


def test_a_host_that_is_not_this_machine(workdir, capsys, snapshot):
    message = error_line(app.main, ["--host", "192.0.2.1", "--auth", "a:b"], workdir, capsys, snapshot)  # TEST-NET-1
    assert message.startswith("cannot listen on 192.0.2.1:7860: Cannot assign requested address;")


# ---------------------------------------------------------------------------------------------------------------
# YAML files


@pytest.mark.parametrize(
    "text, got",
    [("- max_steps: 5\n", "it holds a list"), ("700\n", "it holds a int"), ("", "it is empty")],
    ids=["list", "number", "empty"],
)
def test_a_yaml_config_that_is_not_a_mapping(workdir, chat_file, capsys, snapshot, tiny_phi, text, got):
    (workdir / "run.yaml").write_text(text)
    args = ["--config", "run.yaml", *train_on(tiny_phi, chat_file)]
    message = error_line(train.main, args, workdir, capsys, snapshot)
    assert message == f"run.yaml must be a YAML mapping of settings (key: value lines); {got}."


def test_a_yaml_config_nested_too_deeply(workdir, chat_file, capsys, snapshot, tiny_phi):
    (workdir / "run.yaml").write_text("[" * 5000 + "]" * 5000 + "\n")
    args = ["--config", "run.yaml", *train_on(tiny_phi, chat_file)]
    assert (
        error_line(train.main, args, workdir, capsys, snapshot) == "run.yaml is nested too deeply to be a config file."
    )


def test_a_yaml_config_with_a_byte_order_mark_and_windows_line_endings(tmp_path):
    config = tmp_path / "windows.yaml"
    config.write_bytes("\ufeffmax_steps: 3\r\nlora_r: 4\r\nlangs: en,de\r\n".encode())
    _, _, lora, data, _, training = parse_train_args(["--config", str(config)])
    assert (training.max_steps, lora.lora_r, data.lang_list) == (3, 4, ["en", "de"])


def test_a_run_config_that_is_not_a_mapping(workdir, capsys, snapshot):
    (workdir / "run").mkdir()
    (workdir / "run" / "run_config.yaml").write_text("just a line of text\n")
    message = error_line(report.main, ["--model_dir", "run"], workdir, capsys, snapshot)
    assert message == (
        "run/run_config.yaml is not a mapping of settings (key: value lines); train again to rewrite it."
    )


# ---------------------------------------------------------------------------------------------------------------
# Batch prompts and the data entry points


def test_batch_prompts_with_a_byte_order_mark_and_windows_line_endings(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "Hi"}), "", json.dumps({"messages": [{"role": "user", "content": "Yo"}]})]
    prompts.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    assert inference.read_prompts(prompts) == [{"prompt": "Hi"}, {"messages": [{"role": "user", "content": "Yo"}]}]


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            b'{"prompt": "Gr\xfc\xdf dich"}\n',
            "prompts.jsonl is not UTF-8 text; convert it (e.g. iconv -t utf-8) and try again.",
        ),
        (
            b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n',
            'prompts.jsonl line 1: expected {"prompt": "..."} or {"messages": [...]} ending with a user turn.',
        ),
        (
            b'{"messages": [7]}\n',
            'prompts.jsonl line 1: expected {"prompt": "..."} or {"messages": [...]} ending with a user turn.',
        ),
        (b"[" * 100_000 + b"\n", "prompts.jsonl line 1 is not JSON: RecursionError."),
    ],
    ids=["latin-1", "system-role", "not-a-message", "nested"],
)
def test_batch_prompts_that_cannot_be_read(workdir, capsys, snapshot, content, expected):
    (workdir / "prompts.jsonl").write_bytes(content)
    args = ["--input", "prompts.jsonl", "--output", "answers.jsonl", "--adapter", "model"]
    assert error_line(inference.main, args, workdir, capsys, snapshot) == expected


def test_a_parent_id_loop_stops_training_in_one_line(workdir, capsys, snapshot, tiny_phi):
    rows = [
        {"message_id": "a", "parent_id": "b", "role": "prompter", "text": "Hi"},
        {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "Hello"},
    ]
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tiny_phi), "--dataset", "rows.jsonl", "--output_dir", "out"]
    assert error_line(train.main, args, workdir, capsys, snapshot) == (
        "rows.jsonl: row 1: message 'a' is its own ancestor (parent_id links loop: 'a' -> 'b' -> 'a'); fix the "
        "parent_id of these rows or remove them."
    )

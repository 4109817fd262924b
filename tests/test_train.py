"""End to end on CPU: 4-bit nf4 QLoRA training of the tiny Phi model, then the adapter in use."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train
from chat_template import CHAT_TEMPLATE, PORTABLE_CHAT_TEMPLATE
from model_utils import load_tokenizer
from train_settings import parse_train_args

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "Can you help me?",
    "Is water wet?",
    "Do cats purr?",
    "Is the sky blue?",
    "Can I learn Python?",
    "Are you a robot?",
    "Is it raining?",
]


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def yes_run(tiny_phi, tmp_path_factory):
    """Teach the tiny model to answer every question with "Yes." and stop: a reply we can check exactly."""
    folder = tmp_path_factory.mktemp("yes")
    data = folder / "yes.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}]}) + "\n"
            for q in QUESTIONS
        )
    )
    out = folder / "model"
    trainer, result = train.main(
        [
            "--model",
            str(tiny_phi),
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--eval_split",
            "",
            "--max_steps",
            "30",
            "--learning_rate",
            "0.01",
            "--warmup_steps",
            "0",
            "--lora_r",
            "8",
            "--lora_dropout",
            "0",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--logging_steps",
            "5",
            "--save_steps",
            "10",
            "--save_total_limit",
            "2",
        ]
    )
    return trainer, result, out


def test_training_writes_adapter_tokenizer_and_config(yes_run, tiny_phi):
    trainer, result, out = yes_run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "run_config.yaml",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    assert (
        trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.__class__.__name__
        == "Params4bit"
    )  # the base really is 4-bit
    logged = losses(trainer)
    assert all(math.isfinite(x) for x in logged) and math.isfinite(result.training_loss)
    assert logged[-1] < logged[0]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_phi)
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    # The saved tokenizer carries the portable template; loaded again (report, inference), the masking one is back.
    assert (out / "chat_template.jinja").read_text() == PORTABLE_CHAT_TEMPLATE
    assert load_tokenizer(str(out)).chat_template == CHAT_TEMPLATE
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["model_name_or_path"] == str(tiny_phi) and run_config["max_steps"] == 30
    # The saved run config is a valid --config file that reproduces the run's settings.
    *_, training = parse_train_args(["--config", str(out / "run_config.yaml")])
    assert training.learning_rate == 0.01 and training.output_dir == str(out)
    assert (training.eos_token, training.pad_token, training.hub_token) == (None, None, None)  # not "<EOS_TOKEN>"


def test_adapter_loads_with_plain_peft_and_stops_at_eos(yes_run, tiny_phi):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = yes_run
    tokenizer = AutoTokenizer.from_pretrained(out)  # the saved tokenizer carries the chat template
    base = AutoModelForCausalLM.from_pretrained(tiny_phi)
    model = PeftModel.from_pretrained(base, out).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the grass green?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = output[0][inputs["input_ids"].shape[1] :]
    assert tokenizer.decode(reply) == " Yes.<|endoftext|>"  # the trained EOS ends the reply


def test_inference_cli_answers_from_the_output_folder(yes_run):
    _, _, out = yes_run
    result = subprocess.run(
        [
            sys.executable,
            "inference.py",
            "Is the grass green?",
            "--adapter",
            str(out),
            "--temperature",
            "0",
            "--max_new_tokens",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Yes.\n"  # only the reply, and it stopped at EOS


def test_tiny_cpu_config_trains_on_the_sample_and_resumes(tiny_cpu_run, tmp_path):
    first, trained, args = tiny_cpu_run
    assert first.state.global_step == 4
    assert any("eval_loss" in entry for entry in first.state.log_history)  # held-out trees evaluated
    assert (trained / "checkpoint-4" / "trainer_state.json").is_file()
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    args = [*args[: args.index("--output_dir") + 1], str(out), *args[args.index("--output_dir") + 2 :]]
    second, _ = train.main([*args, "--max_steps", "6", "--resume", "--final_report", "false"])
    assert second.state.global_step == 6
    steps_run = [entry["step"] for entry in second.state.log_history if "loss" in entry]
    assert steps_run[-2:] == [5, 6] and losses(second)[:4] == losses(first)  # continued, history kept
    assert torch.isfinite(torch.tensor(losses(second))).all()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output_dir", str(tmp_path / "empty"), "--resume"])
    assert exit_info.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err

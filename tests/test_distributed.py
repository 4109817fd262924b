"""train.py under torchrun and accelerate launch: two processes on CPU (gloo), as on two GPUs.

Each process loads the 4-bit base and trains the LoRA adapter on its share of every batch; DDP averages the
gradients. The runs use conftest's tiny_cpu_run settings with half the micro-batch, so that the global batch (2
processes x 2 = 4) equals that one-process run's (1 x 4) and the two can be compared step by step.
FSDP needs GPUs (accelerate has no FSDP on CPU): its config is checked as far as the CPU allows.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from model_utils import ModelError

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("distributed_train.py")
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], args: list[str], dump_dir: Path) -> str:
    """Run tests/distributed_train.py under a launcher; each process writes its LoRA weights to dump_dir."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    # One thread per process: the two processes share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_DUMP_DIR": str(dump_dir), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*launcher, str(HELPER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def accelerate_ddp() -> list[str]:
    config = ACCELERATE_CONFIGS / "ddp.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)] + [
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]


def with_output_dir(args: list[str], out: Path) -> list[str]:
    i = args.index("--output_dir")
    return [*args[: i + 1], str(out), *args[i + 2 :]]


def losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def files(folder: Path) -> set[str]:
    """Every file under folder (TensorBoard's run folder, named by time and host, left out)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "runs" not in p.parts}


@pytest.fixture(scope="module")
def two_process_run(tiny_cpu_run, tmp_path_factory):
    """tiny_cpu_run's training (4 steps, report included) by two processes under torchrun, micro-batch 2 each."""
    _, _, args = tiny_cpu_run
    folder = tmp_path_factory.mktemp("two-processes")
    out = folder / "model"
    stdout = launch(
        torchrun(),
        [*with_output_dir(args, out), "--max_steps", "4", "--per_device_train_batch_size", "2"],
        folder / "weights",
    )
    return out, folder / "weights", stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_both_processes_end_with_the_same_adapter_as_the_one_saved(two_process_run):
    out, weights, _ = two_process_run
    rank0, rank1 = load_file(weights / "rank0.safetensors"), load_file(weights / "rank1.safetensors")
    saved = load_file(out / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() == saved.keys() and len(saved) == 2 * 6 * 2  # A and B, 6 targets, 2 layers
    for name in saved:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name
    assert all(saved[name].abs().sum() > 0 for name in saved if "lora_B" in name)  # B starts at zero: it trained


@pytest.mark.slow
@pytest.mark.distributed
def test_files_are_written_once_as_in_a_one_process_run(two_process_run, tiny_cpu_run):
    out, _, stdout = two_process_run
    _, one_process_out, _ = tiny_cpu_run
    # The same files as one process writes, report included; only the random-number states are per process.
    expected = {
        name.replace("rng_state.pth", f"rng_state_{rank}.pth") for name in files(one_process_out) for rank in (0, 1)
    }
    assert files(out) == expected
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 1  # one TensorBoard log, the main process's
    assert stdout.count("Saved the adapter to") == 1 and stdout.count("held-out loss (assistant tokens)") == 1
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["output_dir"] == str(out) and run_config["per_device_train_batch_size"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_global_batch_is_reported_and_counted_as_in_one_process(two_process_run, tiny_cpu_run):
    out, _, stdout = two_process_run
    one_process, one_process_out, _ = tiny_cpu_run
    line = "micro-batch 2 x accumulation 1 x 2 processes = 4 packed rows of up to 256 tokens per optimizer step"
    assert stdout.count(line) == 1
    metrics = json.loads((out / "train_results.json").read_text())
    assert (metrics["processes"], metrics["global_batch_size"]) == (2, 4)
    one_metrics = json.loads((one_process_out / "train_results.json").read_text())
    assert (one_metrics["processes"], one_metrics["global_batch_size"]) == (1, 4)
    assert (
        "micro-batch 2 x accumulation 1 x 2 processes = 4 packed rows of up to 256 tokens"
        in (out / "README.md").read_text()
    )
    # Same global batch, same examples in each step (accelerate deals a step's batches out to the processes): the
    # Trainer counts the same epochs, and the losses agree up to float rounding (padding differs per micro-batch).
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(one_process.state.epoch)
    assert len(losses(state["log_history"])) == 4
    assert losses(state["log_history"]) == pytest.approx(losses(one_process.state.log_history), rel=1e-5)
    # Measured: training losses within 1e-6 (relative); adapters within one bf16 step (TRL keeps LoRA weights in bf16).
    two, one = load_file(out / "adapter_model.safetensors"), load_file(one_process_out / "adapter_model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name].float(), one[name].float(), rtol=0, atol=2**-8)


@pytest.mark.slow
@pytest.mark.distributed
def test_resumed_two_process_run_continues_from_the_checkpoint(two_process_run, tiny_cpu_run, tmp_path):
    """The resumed run goes through accelerate launch with configs/accelerate/ddp.yaml."""
    trained, _, _ = two_process_run
    _, _, args = tiny_cpu_run
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    first = json.loads((trained / "trainer_state.json").read_text())
    args = [*with_output_dir(args, out), "--per_device_train_batch_size", "2"]
    launch(accelerate_ddp(), [*args, "--max_steps", "6", "--resume", "--final_report", "false"], tmp_path / "weights")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (out / "checkpoint-6" / "adapter_model.safetensors").is_file()
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6] and losses(state["log_history"])[:4] == losses(first["log_history"])
    rank0, rank1 = (
        load_file(tmp_path / "weights" / "rank0.safetensors"),
        load_file(tmp_path / "weights" / "rank1.safetensors"),
    )
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert not all(torch.equal(rank0[name], load_file(trained / "adapter_model.safetensors")[name]) for name in rank0)


def accelerate_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config` gives each process (parsed by accelerate itself)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    return prepare_multi_gpu_env(args)


def test_ddp_config_launches_plain_data_parallel():
    env = accelerate_env(ACCELERATE_CONFIGS / "ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # precision is train.py's --bf16, not the launcher's
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_fsdp_qlora_config_gives_what_fsdp_qlora_needs(tiny_phi, monkeypatch):
    """FSDP itself needs GPUs; on CPU: the settings each process gets, and the 4-bit model they lead to."""
    from peft import get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy

    from adapter_utils import build_lora_config
    from config import LoraArguments, ModelArguments, QuantizationArguments
    from model_utils import load_model

    env = accelerate_env(ACCELERATE_CONFIGS / "fsdp_qlora.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "PhiDecoderLayer"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # the final adapter is a plain safetensors file
    for name, value in env.items():
        if name.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(name, value)

    # The 4-bit weights are stored in the compute dtype, so every parameter of a decoder layer has one float dtype:
    # what FSDP needs to flatten and shard the layer. (Without FSDP they stay in bitsandbytes' uint8.)
    quant = QuantizationArguments(bnb_4bit_compute_dtype="bfloat16")
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), quant)
    layer = model.model.layers[0]
    assert type(layer).__name__ == "PhiDecoderLayer"
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert type(layer.self_attn.q_proj.weight).__name__ == "Params4bit"
    # peft's wrap policy (the Trainer applies it under FSDP) finds the decoder layer class the config names, and
    # wraps the trainable LoRA layers on their own (FSDP with use_orig_params false needs that).
    peft_model = get_peft_model(model, build_lora_config(LoraArguments(lora_r=8), "phi"))
    policy = fsdp_auto_wrap_policy(peft_model)
    assert policy(module=layer, recurse=False, nonwrapped_numel=0)
    assert policy(module=layer.self_attn.q_proj.lora_A["default"], recurse=False, nonwrapped_numel=0)
    assert not policy(module=layer.self_attn.q_proj.base_layer, recurse=False, nonwrapped_numel=0)
    with pytest.raises(ModelError, match="bnb_4bit_quant_storage"):
        load_model(
            ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(bnb_4bit_quant_storage="uint8")
        )


def test_evaluate_leaves_the_report_to_the_main_process(monkeypatch, tmp_path, capsys):
    import report

    monkeypatch.setenv("RANK", "1")  # what torchrun sets in the second process
    assert report.main(["--model_dir", str(tmp_path / "missing")]) is None  # no error, nothing read or written
    assert not (tmp_path / "missing").exists() and capsys.readouterr().err == ""


def test_fsdp_qlora_defaults_switch_the_optimizer_and_checkpoint_reentrant(monkeypatch, caplog):
    """Under accelerate's FSDP variables: paged AdamW (the recipe's) gives way to adamw_torch, and activation
    checkpointing is reentrant, as in PEFT's FSDP-QLoRA guide; without them, neither changes."""
    import logging

    from train_settings import parse_train_args

    recipe = ["--config", str(ROOT / "configs" / "phi2_oasst1.yaml")]
    *_, plain = parse_train_args(recipe)
    assert plain.activation_checkpointing_kwargs is None  # transformers' default: non-reentrant
    for name, value in accelerate_env(ACCELERATE_CONFIGS / "fsdp_qlora.yaml").items():
        if name.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING):
        *_, fsdp = parse_train_args(recipe)
    assert fsdp.optim == "adamw_torch" and fsdp.activation_checkpointing
    assert fsdp.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert "--optim paged_adamw_32bit does not work under FSDP: using adamw_torch." in caplog.messages
    *_, chosen = parse_train_args([*recipe, "--activation_checkpointing_kwargs", '{"use_reentrant": false}'])
    assert chosen.activation_checkpointing_kwargs == {"use_reentrant": False}  # a user's choice stays


@pytest.mark.slow
@pytest.mark.distributed
def test_dpo_under_torchrun_ends_with_identical_adapters_on_both_processes(tiny_cpu_run, tmp_path):
    """DPO from tiny_cpu_run's SFT adapter (its frozen copy the reference) by two processes, gloo on CPU."""
    _, sft_adapter, args = tiny_cpu_run
    out = tmp_path / "model"
    dpo = ["--method", "dpo", "--policy", "best_vs_rest", "--init_adapter", str(sft_adapter), "--max_steps", "3"]
    dpo += ["--per_device_train_batch_size", "2", "--final_report", "false", "--learning_rate", "0.005"]
    stdout = launch(torchrun(), [*with_output_dir(args, out), *dpo], tmp_path / "weights")
    rank0, rank1 = (load_file(tmp_path / "weights" / f"rank{rank}.safetensors") for rank in (0, 1))
    saved, start = (load_file(folder / "adapter_model.safetensors") for folder in (out, sft_adapter))
    assert rank0.keys() == rank1.keys() == saved.keys() == start.keys()
    for name in saved:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name
    assert any(not torch.equal(saved[name], start[name]) for name in saved)  # DPO moved it
    assert not (out / "ref").exists() and stdout.count("Saved the adapter to") == 1
    batch = "micro-batch 2 x accumulation 1 x 2 processes = 4 preference pairs per optimizer step"
    assert batch in stdout

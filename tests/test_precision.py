"""Training precision on the GPUs users have: float32 master weights under fp16, float32 for the norms only, and a run
that stops at the first nan/inf loss. All on CPU: the CUDA-only parts are reached through the same functions a GPU run
calls. The decision itself (a pure function of the device) is in test_quantization_utils.py."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from adapter_utils import build_lora_config
from checkpoint_utils import checkpoints, is_complete_checkpoint
from config import LoraArguments, ModelArguments, QuantizationArguments
from model_utils import load_model
from quantization_utils import (
    keep_norms_in_float32,
)
from train_settings import TrainingConfig
from trainer_setup import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Is water wet?", "Yes."), ("Do cats purr?", "Yes, they do."), ("Is the sky green?", "No, blue.")]
PAIRS += [("Are you a robot?", "No."), ("Can fish fly?", "Some can glide."), ("Is ice cold?", "Yes.")]
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]


def tiny_trainer(tiny_phi, tokenizer, out: Path, precision: str, max_steps: int = 2, quant=None):
    """build_trainer on the tiny 4-bit model, as train.py calls it, with the mixed precision of a GPU run
    ("bf16": an A100, "fp16": a T4) or none ("float32": a CPU run)."""
    args = TrainingConfig(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=1,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        report_to="none",
        seed=42,
    )
    assert not args.fp16 and not args.bf16  # no CUDA here: TrainingConfig turned them off...
    args.fp16, args.bf16 = precision == "fp16", precision == "bf16"  # ...and a GPU run has one of them on
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), quant or QuantizationArguments())
    lora = build_lora_config(LoraArguments(lora_r=4, lora_dropout=0.0), "phi")
    return build_trainer(model, tokenizer, args, Dataset.from_list(RECORDS), peft_config=lora)


def trainable_dtypes(trainer) -> set[torch.dtype]:
    return {p.dtype for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.slow
def test_lora_weights_are_bf16_only_when_training_in_bf16(tiny_phi, tokenizer, tmp_path):
    # TRL makes the LoRA weights of a 4-bit model bf16 (the QLoRA paper's choice for bf16 training)...
    assert trainable_dtypes(tiny_trainer(tiny_phi, tokenizer, tmp_path / "bf16", "bf16")) == {torch.bfloat16}
    # ...and in float32 on CPU they stay float32: bf16 LoRA matmuls are emulated (slow) on most CPUs.
    trainer = tiny_trainer(tiny_phi, tokenizer, tmp_path / "float32", "float32")
    assert trainable_dtypes(trainer) == {torch.float32}
    trainer.train()
    assert trainable_dtypes(trainer) == {torch.float32}


@pytest.mark.slow
def test_fp16_trains_float32_master_weights_also_after_resume(tiny_phi, tokenizer, tmp_path):
    # The GradScaler of fp16 training cannot unscale bf16 gradients: with fp16 the LoRA weights are float32.
    out = tmp_path / "fp16"
    trainer = tiny_trainer(tiny_phi, tokenizer, out, "fp16")
    assert trainable_dtypes(trainer) == {torch.float32}
    trainer.train()
    assert trainable_dtypes(trainer) == {torch.float32}
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}

    resumed = tiny_trainer(tiny_phi, tokenizer, out, "fp16", max_steps=3)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert trainable_dtypes(resumed) == {torch.float32}
    assert {t.dtype for t in load_file(out / "checkpoint-3" / "adapter_model.safetensors").values()} == {torch.float32}


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_only_the_norms_are_upcast_to_float32(tiny_phi, tokenizer, tmp_path):
    from peft import prepare_model_for_kbit_training

    bf16 = QuantizationArguments(bnb_4bit_compute_dtype="bfloat16")  # what a GPU run loads; CPU defaults to float32
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), bf16)
    keep_norms_in_float32(model)
    by_dtype = {}
    for name, param in model.named_parameters():
        by_dtype.setdefault(param.dtype, []).append(name)
    assert all("layernorm" in name for name in by_dtype[torch.float32])
    assert len(by_dtype[torch.float32]) == 2 * 2 + 2  # weight and bias of each layer's norm and of the final one
    assert "model.embed_tokens.weight" in by_dtype[torch.bfloat16] and "lm_head.weight" in by_dtype[torch.bfloat16]
    assert not any(p.requires_grad for p in model.parameters())

    # peft's preparation upcasts the embedding, the output head (weight and bias) and the linear layers' biases too.
    peft_prepared = prepare_model_for_kbit_training(load_model(ModelArguments(model_name_or_path=str(tiny_phi)), bf16))
    config = model.config
    vocab, hidden, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
    biases = layers * (4 * hidden + config.intermediate_size + hidden)  # q, k, v, dense; fc1; fc2
    upcast_elsewhere = 2 * vocab * hidden + vocab + biases
    assert (vocab, hidden, layers, upcast_elsewhere) == (1024, 64, 2, 133_248)
    assert parameter_bytes(peft_prepared) - parameter_bytes(model) == 2 * upcast_elsewhere

    # Training runs on this mix (bf16 residual stream, float32 norms), here without autocast.
    trainer = tiny_trainer(tiny_phi, tokenizer, tmp_path / "out", "float32", max_steps=1, quant=bf16)
    assert trainer.model.base_model.model.model.final_layernorm.weight.dtype == torch.float32
    assert trainer.model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.slow
def test_a_run_stops_at_the_first_nonfinite_loss_and_keeps_the_last_good_checkpoint(tiny_phi, tmp_path):
    """A learning rate of 1e6 blows the tiny model up: the loss is finite at steps 1 and 2 and nan from step 3."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "model"
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--eval_split", "", "--max_steps", "6"]
    args += ["--save_steps", "1", "--logging_steps", "1", "--lora_r", "4", "--learning_rate", "1e6"]
    args += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--warmup_steps", "0"]
    args += ["--report_to", "none", "--output_dir", str(out), "--seed", "42"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stderr
    # The Trainer's own log, one line per step: finite at steps 1 and 2, nan at step 3, and nothing after it.
    logged = [json.loads(line.replace("'", '"'))["loss"] for line in re.findall(r"\{'loss'.*?\}", result.stdout)]
    assert [math.isfinite(float(loss)) for loss in logged] == [True, True, False]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [
        f"error: the training loss became nan/inf at step 3; {out / 'checkpoint-2'} is the last good checkpoint "
        "(nothing of step 3 was saved). Lower --learning_rate (now 1e+06) and start again with --overwrite, or "
        "check the data."
    ]
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert all(is_complete_checkpoint(p) for p in checkpoints(out))
    adapter = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(math.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)
    # Not a finished run: no final adapter and no run_config.yaml, so --resume or --overwrite is what comes next.
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run_config.yaml").exists()


@pytest.mark.slow
def test_the_adapter_runs_in_the_base_compute_dtype_and_merging_loads_it_in_float32(yes_adapter):
    from adapter_utils import load_chat_model

    bf16 = QuantizationArguments(bnb_4bit_compute_dtype="bfloat16")  # the report's 4-bit base on a bf16 GPU
    for float32_adapter, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        model, _ = load_chat_model(yes_adapter, quant_args=bf16, float32_adapter=float32_adapter)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {dtype}

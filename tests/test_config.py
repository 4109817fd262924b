"""Settings: YAML defaults, CLI overrides, unknown keys rejected, every shipped config parses."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_utils import build_lora_config, lora_target_modules
from config import PHI_LORA_TARGETS, QuantizationArguments
from quantization_utils import build_bnb_config
from train_settings import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").rglob("*.yaml"))  # for `accelerate launch`
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(ACCELERATE_CONFIGS))  # for train.py --config


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.001\nlora_r: 8\npolicy: replies\nmax_steps: 5\n")
    model, quant, lora, data, _, training = parse_train_args(["--config", str(config), "--lora_r", "4"])
    assert training.learning_rate == 0.001 and training.max_steps == 5
    assert data.policy == "replies"
    assert lora.lora_r == 4  # the flag wins over the file
    assert model.model_name_or_path == "microsoft/phi-2" and quant.load_in_4bit  # untouched defaults


def test_unknown_yaml_key_is_rejected(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rat: 0.001\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_train_args(["--config", str(config)])


@pytest.mark.slow
def test_unknown_flag_is_one_clear_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--lora_rank", "8", "--output_dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--lora_rank" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    model, quant, lora, data, _, training = parse_train_args(["--config", str(path)])
    assert training.output_dir and training.max_steps > 0
    assert training.assistant_only_loss


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are an error there too
    assert isinstance(config, ClusterConfig) and config.num_processes >= 2 and config.mixed_precision == "no"


def test_every_yaml_under_configs_is_parsed_by_a_test():
    assert set(CONFIGS) | set(ACCELERATE_CONFIGS) == set((ROOT / "configs").rglob("*.y*ml"))
    assert ACCELERATE_CONFIGS and CONFIGS


def test_default_run_is_the_fixed_original_recipe():
    model, quant, lora, data, _, training = parse_train_args(["--config", str(ROOT / "configs" / "phi2_oasst1.yaml")])
    defaults = parse_train_args([])
    for parsed in (model, quant, lora, data), defaults[:4]:
        m, q, lo, d = parsed
        assert m.model_name_or_path == "microsoft/phi-2" and m.attn_implementation == "sdpa"
        assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
        assert (lo.lora_r, lo.lora_alpha, lo.lora_dropout) == (64, 16, 0.1)
        assert d.dataset == "OpenAssistant/oasst1" and d.policy == "best" and d.lang_list == []
    for t in (training, defaults[5]):
        assert (t.learning_rate, t.max_grad_norm, t.warmup_steps, t.max_steps) == (2e-4, 0.3, 0.05, 700)
        assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_length) == (4, 2, 512)
        assert t.packing and t.packing_strategy == "bfd" and t.gradient_checkpointing
        assert not t.trust_remote_code
        # No CUDA here: paged AdamW falls back to plain AdamW and training runs in float32.
        if not torch.cuda.is_available():
            assert t.optim == "adamw_torch" and not t.bf16 and not t.fp16
    assert lora_target_modules(lora.lora_target_modules, "phi") == PHI_LORA_TARGETS.split(",")


def test_quantization_and_lora_builders():
    bnb = build_bnb_config(QuantizationArguments())
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    expected = torch.float32 if not torch.cuda.is_available() else bnb.bnb_4bit_compute_dtype
    assert bnb.bnb_4bit_compute_dtype == expected
    assert build_bnb_config(QuantizationArguments(load_in_4bit=False)) is None
    from config import LoraArguments

    assert lora_target_modules("auto", "phi") == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert lora_target_modules("auto", "llama") == "all-linear"
    assert lora_target_modules("q_proj, v_proj", "llama") == ["q_proj", "v_proj"]
    lora = build_lora_config(LoraArguments(), "phi")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (64, 16, 0.1, "CAUSAL_LM")


def test_activation_checkpointing_is_on_by_default_and_the_old_name_still_turns_it_off():
    *_, default = parse_train_args([])
    *_, new_name = parse_train_args(["--activation_checkpointing", "false"])
    *_, old_name = parse_train_args(["--gradient_checkpointing", "false"])
    assert default.activation_checkpointing and default.gradient_checkpointing
    assert not new_name.activation_checkpointing and not new_name.gradient_checkpointing
    assert not old_name.activation_checkpointing and not old_name.gradient_checkpointing

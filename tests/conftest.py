"""Shared fixtures: the bundled oasst1 sample and a tiny random model with Phi-2's architecture."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE = ROOT / "data" / "oasst1" / "laion_en_100_tree.jsonl"


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory) -> Path:
    """A random-weight PhiForCausalLM and a byte-level BPE tokenizer, saved like a Hub checkpoint."""
    from tiny_model import build_tiny_phi

    return build_tiny_phi(tmp_path_factory.mktemp("tiny-phi"))


@pytest.fixture(scope="session")
def tokenizer(tiny_phi):
    from model_utils import load_tokenizer

    return load_tokenizer(str(tiny_phi))


@pytest.fixture(scope="session")
def tiny_cpu_run(tiny_phi, tmp_path_factory):
    """configs/tiny_cpu.yaml for 4 steps on the real sample (10% of the trees held out), with the final report."""
    import train

    out = tmp_path_factory.mktemp("tiny-cpu") / "model"
    args = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_phi), "--output_dir", str(out)]
    args += ["--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--report_to", "tensorboard"]
    args += ["--report_prompts", "3", "--report_max_new_tokens", "8"]
    trainer, _ = train.main([*args, "--max_steps", "4"])
    return trainer, out, args

"""The prepared GPU check (bench/gpu_check.sh) rehearsed on CPU, and what `make gpu-wheels` carries to the GPU.

The rehearsal runs every step of the check at tiny size (about 2-3 minutes on 2 cores): these tests keep the one
command to run on a GPU machine from rotting between the runs on a GPU.
"""

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from transformers import PhiConfig, PhiForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
from gpu_check import GPU_BUDGET_S, REHEARSAL, TIMED  # noqa: E402
from gpu_phi2 import PHI2, TINY  # noqa: E402
from gpu_probes import TOLERANCE, optimizer_after, planned  # noqa: E402
from gpu_steps import PROMPTS  # noqa: E402
from gpu_wheels import WHEELS, check_needs, travelling_bytes, wheel_needs  # noqa: E402

STEPS = [
    "environment",
    "probes",
    "build_model",
    "bench",
    "train",
    "train_fp16",
    "inference",
    "inference_batch",
    "merge",
    "bench_mb8",
    "bench_mb16",
    "bench_no_gc",
]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`bash bench/gpu_check.sh --rehearsal` with tiny_model.py's tokenizer (CI has no .whl/): (process, out folder,
    the files the archive holds, unpacked)."""
    folder = tmp_path_factory.mktemp("gpu-check")
    out = folder / "out"
    command = ["bash", "bench/gpu_check.sh", "--rehearsal", "--tokenizer", "tiny", "--work", str(folder / "work")]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    with tarfile.open(out / "gpu_check_files.tar.gz") as archive:
        archive.extractall(folder / "files", filter="data")
    return done, out, folder / "files"


@pytest.fixture(scope="module")
def result(rehearsal):
    return json.loads((rehearsal[1] / "gpu_check.json").read_text())


def figures(result, step):
    return result["steps"][step]["figures"]


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_every_step_runs_and_passes_in_order(rehearsal, result):
    done, out, files = rehearsal
    assert done.returncode == 0, done.stdout[-3000:]
    assert list(result["steps"]) == STEPS
    for name, step in result["steps"].items():
        assert (step["status"], step["error"]) == ("passed", None), name
        assert step["seconds"] > 0 and (files / step["log"]).stat().st_size > 0
    # Three files in --out, whatever the steps wrote: the rest is in the archive.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check_files.tar.gz"]
    assert sorted(p.name for p in (files / "logs").iterdir()) == sorted(f"{name}.log" for name in STEPS)
    assert result["kind"] == "rehearsal (tiny Phi-2 on CPU)"
    assert result["finished"] >= result["started"]
    # The whole output is kept beside the figures, and it ends with the summary.
    log = (out / "gpu_check.log").read_text()
    assert log == done.stdout and "goal: every step of the check passes: 12 of 12 passed (met)" in log
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert (result["source"]["from"], result["source"]["commit"]) == ("git", head)


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_environment_reports_the_stack_and_a_working_nf4_round_trip(result):
    env = figures(result, "environment")
    for name in ("torch", "accelerate", "tqdm", "pyyaml", "tensorboard", "matplotlib", "pyarrow", *WHEELS):
        assert env["versions"][name] == importlib.metadata.version(name)
    assert env["unmet_requirements"] == env["warnings"] == []
    assert (env["cuda_available"], env["bnb_backend"], env["bnb_library"]) == (False, "CPU", "libbitsandbytes_cpu.so")
    assert 0.05 < env["nf4_roundtrip_mean_abs_error"] < 0.1  # 4-bit nf4 of N(0, 1) values


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_the_model_is_phi2_architecture_at_tiny_size_with_the_tokenizers_vocabulary(result):
    model = figures(result, "build_model")
    config = {**PHI2, **TINY, "vocab_size": model["tokenizer_vocabulary"]}
    with torch.device("meta"):
        expected = sum(p.numel() for p in PhiForCausalLM(PhiConfig(**config)).parameters())
    assert model["parameters"] == expected
    assert (model["hidden_size"], model["layers"], model["vocab_size"]) == (160, 2, model["tokenizer_vocabulary"])
    assert (model["dtype"], model["tokenizer"]) == ("bfloat16", "tiny_model.py's BPE")


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_bench_compares_both_batchings_and_the_extras_run_ours_alone(rehearsal, result):
    bench = figures(result, "bench")
    original, ours = bench["original"], bench["ours"]
    assert ours["useful_token_share"] == 1.0 > original["useful_token_share"]
    for variant in (original, ours):
        assert (variant["micro_batch"], variant["max_length"], variant["timed_steps"]) == (4, 128, 2)
        assert variant["mfu"] is None and variant["peak_reserved_gib"] is None  # no GPU: no MFU, no CUDA memory
    ratio = ours["real_tokens_per_second"] / original["real_tokens_per_second"]
    assert bench["tokens_per_second_ratio"] == pytest.approx(ratio, abs=0.006)
    for step, micro_batch, checkpointing in (
        ("bench_mb8", 8, True),
        ("bench_mb16", 16, True),
        ("bench_no_gc", 4, False),
    ):
        extra = figures(result, step)
        assert "original" not in extra and extra["ours"]["micro_batch"] == micro_batch
        written = json.loads((rehearsal[2] / f"{step}.json").read_text())["ours"]
        assert (written["activation_checkpointing"], written["packing"]) == (checkpointing, True)


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_training_is_killed_after_a_checkpoint_and_resumed_to_the_end_with_the_report(rehearsal, result):
    train = figures(result, "train")
    steps, save_steps, kill_at = REHEARSAL.train_steps, REHEARSAL.save_steps, REHEARSAL.kill_at
    assert train["checkpoints_at_kill"] == list(range(save_steps, kill_at + 1, save_steps))  # [2, 4]
    assert (train["killed_after_checkpoint"], train["resumed_from"], train["global_step"]) == (kill_at, kill_at, steps)
    assert len(train["losses"]) == steps and all(map(math.isfinite, train["losses"]))
    assert len(train["eval_losses"]) == steps // save_steps
    assert train["report_prompts"] == 2 and train["heldout_examples"] > 0
    for side in ("base", "tuned"):
        assert (
            math.isfinite(train["report"][side]["heldout_loss"]) and 0 <= train["report"][side]["clean_stop_rate"] <= 1
        )
    assert {"adapter_model.safetensors", "run_config.yaml", "eval.json", "loss.png", "README.md"} <= set(
        train["files"]
    )
    assert {p.name for p in (rehearsal[2] / "train").iterdir()} == {
        "eval.json",
        "README.md",
        "loss.png",
        "train_results.json",
        "trainer_state.json",
    }
    log = (rehearsal[2] / "logs" / "train.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ ")]  # the killed run, then --resume
    assert len(commands) == 2 and "(SIGKILL once" in commands[0] and commands[1].endswith(" --resume")
    assert re.search(rf"Resuming from \S*checkpoint-{kill_at}\b", log)


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_the_probes_run_what_a_cpu_can_and_name_what_they_skip(rehearsal, result):
    probes = figures(result, "probes")
    assert json.loads((rehearsal[2] / "probes.json").read_text()) == probes
    assert set(probes["probes"]) == {
        "chunked_logprob_float32",
        "chunked_logprob_bfloat16",
        "linear4bit_lora_float32",
        "linear4bit_lora_bfloat16",
    }
    for name, probe in probes["probes"].items():
        dtype = name.rsplit("_", 1)[1]
        errors = {key: value for key, value in probe["figures"].items() if key.endswith("_error")}
        assert probe["status"] == "passed" and len(errors) == 4, name  # the output and three gradients
        assert all(0 <= value <= TOLERANCE[dtype] for value in errors.values()), (name, errors)
    assert probes["probes"]["chunked_logprob_float32"]["figures"]["kernels"] == "torch (no Triton on this device)"
    assert set(probes["skipped"]) == {
        "paged_adamw",
        "chunked_logprob_float16",
        "linear4bit_lora_float16",
        "triton_and_addmm_out_dtype",
    }
    # The probes' choice of optimizer reaches every training step's command line.
    assert probes["optim"] == result["optim"]["optim"] == "paged_adamw_32bit" and "optim_reason" not in probes
    for step in ("train", "train_fp16", "bench", "bench_mb8", "bench_mb16", "bench_no_gc"):
        log = (rehearsal[2] / "logs" / f"{step}.log").read_text()
        commands = [line for line in log.splitlines() if line.startswith("$ ")]
        assert commands and all("--optim paged_adamw_32bit" in line for line in commands), step


def test_the_probes_are_the_dtypes_each_gpu_trains_in():
    h200, skipped = planned("cuda", (9, 0))
    assert [name for name, _, _ in h200] == [
        "paged_adamw",
        "chunked_logprob_bfloat16",
        "chunked_logprob_float16",
        "linear4bit_lora_bfloat16",
        "linear4bit_lora_float16",
    ]
    assert skipped == {}
    t4, skipped = planned("cuda", (7, 5))
    assert [name for name, _, _ in t4] == ["paged_adamw", "chunked_logprob_float16", "linear4bit_lora_float16"]
    assert set(skipped) == {"chunked_logprob_bfloat16", "linear4bit_lora_bfloat16"}


def test_a_failed_paged_adamw_probe_moves_the_training_steps_to_adamw_torch():
    failed = {"status": "failed", "error": "exit 1: cget_managed_ptr failed"}
    assert optimizer_after({"paged_adamw": failed, "linear4bit_lora_bfloat16": {"status": "passed"}}) == (
        "adamw_torch",
        "paged AdamW failed here (exit 1: cget_managed_ptr failed): the later steps train with adamw_torch",
    )
    assert optimizer_after({"paged_adamw": {"status": "passed"}}) == ("paged_adamw_32bit", None)
    assert optimizer_after({}) == ("paged_adamw_32bit", None)  # CPU: no paged AdamW to probe; train.py swaps it


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_the_fp16_run_leaves_the_compute_dtype_to_follow_it(result):
    fp16 = figures(result, "train_fp16")
    assert len(fp16["losses"]) == REHEARSAL.precision_steps and all(map(math.isfinite, fp16["losses"]))
    assert fp16["run_config"] == {
        "fp16": "false",
        "bf16": "false",
        "bnb_4bit_compute_dtype": "auto",
        "optim": "adamw_torch",
    }
    assert fp16["compute_dtype"] == "float32"  # train.py's CPU rule; on a GPU the step requires float16
    assert "note" not in result["steps"]["train_fp16"]


def test_the_steps_that_always_run_leave_room_in_the_gpu_budget():
    """On a GPU the timed steps run one after another, the others side by side (gpu_check.main)."""
    planned = 0.0
    for stage in gpu_check.STEPS:
        estimates = [step.estimate_s for step in stage if not step.optional]
        if estimates:
            planned += sum(estimates) if TIMED & {step.name for step in stage} else max(estimates)
    assert planned == 325 and planned <= 0.8 * GPU_BUDGET_S


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_inference_answers_one_shot_and_batch_and_merges(rehearsal, result):
    inference = figures(result, "inference")
    assert inference["reply"] == (rehearsal[2] / "inference" / "oneshot.txt").read_text()
    batch = figures(result, "inference_batch")
    answers = [json.loads(line) for line in (rehearsal[2] / "inference" / "answers.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in a.items() if k in ("prompt", "messages")} for a in answers] == PROMPTS
    assert batch["replies"] == [a["reply"] for a in answers] and batch["answers"] == 3
    merged = figures(result, "merge")
    assert merged["parameters"] == figures(result, "build_model")["parameters"] and merged["dtype"] == "bfloat16"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(merged["files"])
    assert "adapter_config.json" not in merged["files"]


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_goals_are_read_off_the_bench_figures(result):
    goals, ours = result["goals"], figures(result, "bench")["ours"]
    assert goals["peak_allocated_gb"]["value"] == round(ours["peak_memory_gib"] * 2**30 / 1e9, 2)
    assert goals["tokens_per_second_ratio"]["value"] == figures(result, "bench")["tokens_per_second_ratio"]
    assert (goals["mfu"]["value"], goals["mfu"]["met"]) == (None, None)  # not measured on CPU
    assert goals["every_step_passed"] == {
        "goal": "every step of the check passes",
        "value": "12 of 12 passed",
        "met": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# make gpu-wheels


def test_carried_wheels_are_in_range_and_satisfy_each_other():
    requirements = {
        canonicalize_name((req := Requirement(line.split("#")[0])).name): req
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    carried_by_requirements = {name for name in WHEELS if name in requirements}
    assert carried_by_requirements == {"bitsandbytes", "transformers", "trl", "peft", "datasets", "huggingface-hub"}
    for name in carried_by_requirements:
        assert requirements[name].specifier.contains(WHEELS[name][0]), name
    assert requirements["torch"].specifier.contains("2.11.0+cu130")  # the GPU machine's torch
    # What each carried package needs of the others (dill and multiprocess for datasets, httpx2 for huggingface_hub,
    # ...), read from this environment's metadata where it holds the carried version.
    needs = 0
    for name, (version, _) in WHEELS.items():
        if importlib.metadata.version(name) != version:
            continue
        for text in importlib.metadata.requires(name) or []:
            need = Requirement(text)
            if canonicalize_name(need.name) in WHEELS and (not need.marker or need.marker.evaluate({"extra": ""})):
                assert need.specifier.contains(WHEELS[canonicalize_name(need.name)][0]), (name, need)
                needs += 1
    assert needs >= 8  # e.g. datasets: dill, multiprocess, huggingface_hub; httpx2: httpcore2, truststore


def test_travelling_size_counts_the_tree_as_git_sees_it_and_the_carried_folder(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("cache/\n.whl/\n")  # 13 bytes
    (tmp_path / "tracked.py").write_bytes(b"x" * 100)
    (tmp_path / "untracked.txt").write_bytes(b"y" * 30)  # travels: untracked but not ignored
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "model.bin").write_bytes(b"z" * 5000)  # ignored: stays behind
    (tmp_path / ".whl" / "tokenizer").mkdir(parents=True)
    (tmp_path / ".whl" / "a.whl").write_bytes(b"w" * 700)
    (tmp_path / ".whl" / "tokenizer" / "t.json.gz").write_bytes(b"t" * 11)
    git("add", ".gitignore", "tracked.py")
    assert travelling_bytes(tmp_path) == {"working tree": 13 + 100 + 30, ".whl": 711}


def test_each_carried_wheels_needs_are_checked_against_the_carried_and_the_recorded_versions(tmp_path):
    """A wheel's METADATA as pip writes it: the needs that apply on the GPU machine's Python 3.12 on Linux, each
    against the carried version or the image's recorded one; the rest are listed as not checked."""
    metadata = "\n".join(
        [
            "Metadata-Version: 2.4",
            "Name: demo",
            "Version: 1.0",
            "Requires-Dist: anyio>=4.10; sys_platform != 'emscripten'",  # carried: 4.16.0
            "Requires-Dist: typing-extensions>=4.5.0; python_version < '3.13'",  # carried: 4.16.0
            "Requires-Dist: exceptiongroup>=1.0; python_version < '3.11'",  # not on Python 3.12
            "Requires-Dist: colorama; platform_system == 'Windows'",  # not on Linux
            "Requires-Dist: pytest; extra == 'test'",  # an extra
            "Requires-Dist: torch>=2.12",  # the image's torch is 2.11.0
            "Requires-Dist: idna<3",  # carried: 3.20
            "Requires-Dist: pyarrow>=24.0.0",  # not recorded
        ]
    )
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo-1.0.dist-info/METADATA", metadata + "\n")
    assert [str(need) for need in wheel_needs(wheel)] == [
        'anyio>=4.10; sys_platform != "emscripten"',
        'typing-extensions>=4.5.0; python_version < "3.13"',
        "torch>=2.12",
        "idna<3",
        "pyarrow>=24.0.0",
    ]
    assert check_needs([wheel]) == (
        ["demo needs torch>=2.12, on the image: 2.11.0", "demo needs idna<3, carried: 3.20"],
        ["pyarrow>=24.0.0 (demo)"],
    )

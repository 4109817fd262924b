"""The GPU check's steps (bench/gpu_check.py plans and runs them): each runs the repo's own entry points in processes
of their own, at the size of the run (the GPU's, or the rehearsal's on CPU), checks what they wrote, and returns its
figures, or raises StepError with one line that says how it failed (and the figures it had).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_utils import SAMPLE, SMOLLM2
from gpu_wheels import WHEELS

if TYPE_CHECKING:
    from gpu_check import Check

ROOT = Path(__file__).resolve().parents[1]
CARRIED_TOKENIZER = ROOT / ".whl" / "tokenizer"  # make gpu-wheels puts SmolLM2's tokenizer here
PHI2_PARAMETERS = 2_779_683_840
QLORA_QUESTION = {"role": "user", "content": "What is QLoRA?"}
PROMPTS = [
    {"prompt": "How do I make a good cup of tea?"},
    {"prompt": "Name three uses of a paperclip."},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, QLORA_QUESTION]},
]


class StepError(Exception):
    """A step failed: the message says how, in one line."""


def environment(check: Check, timeout: float) -> dict:
    figures = {}
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, flush=True)
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        figures["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    probe = check.logs / "environment.json"
    check.python("environment", "bench/gpu_environment.py", ",".join(WHEELS), timeout=timeout, stdout=probe)
    figures.update(json.loads(probe.read_text()))
    probe.unlink()
    versions = figures["versions"]
    print(
        "versions: python "
        + figures["python"]
        + "".join(f", {name} {v}" for name, v in versions.items() if v)
        + f"; torch CUDA {figures.get('torch_cuda')}; bitsandbytes library {figures.get('bnb_library')}"
        + (f"; GPU {figures.get('nvidia_smi')}" if figures.get("nvidia_smi") else ""),
        flush=True,
    )
    for warning in figures["warnings"]:
        print(f"warning: {warning}", flush=True)
    problems = list(figures["unmet_requirements"])
    if "import_error" in figures:
        raise StepError("; ".join([*problems, figures["import_error"]]), figures)
    if not check.args.rehearsal:
        if not figures["cuda_available"]:
            problems.append("torch sees no CUDA GPU")
        if not figures["bnb_cuda_library"]:
            problems.append(f"bitsandbytes loaded no CUDA library ({figures['bnb_library']})")
    if figures["nf4_roundtrip_mean_abs_error"] > 0.15:  # nf4 on N(0, 1) values: about 0.07
        problems.append(f"nf4 round trip error {figures['nf4_roundtrip_mean_abs_error']} (expected about 0.07)")
    if problems:
        raise StepError("; ".join(problems), figures)
    return figures


def probes(check: Check, timeout: float) -> dict:
    """bench/gpu_probes.py; its choice of optimizer goes to every later training step (train.py, gpu_phi2.py)."""
    out = check.files / "probes.json"
    code = check.run(
        "probes", [check.args.python, "bench/gpu_probes.py", *check.size.probes, "--json", str(out)], timeout
    )
    if not out.is_file():
        raise StepError(f"bench/gpu_probes.py exited with {code}: {last_error(check.logs / 'probes.log')}")
    result = json.loads(out.read_text())
    check.optim = result["optim"]
    check.result["optim"] = {"optim": check.optim, "from": result.get("optim_reason", "the probes step")}
    if "optim_reason" in result:
        print(f"note: {result['optim_reason']}", flush=True)
    failed = {name: record["error"] for name, record in result["probes"].items() if record["status"] != "passed"}
    if failed:
        raise StepError("; ".join(f"{name}: {error}" for name, error in failed.items()), result)
    return result


def tokenizer_source(check: Check) -> tuple[str, str]:
    """SmolLM2's tokenizer carried in .whl/ (unpacked), else from cache/, else tiny_model.py's BPE: (what
    gpu_phi2.py --tokenizer takes, a description)."""
    choice = check.args.tokenizer
    if choice == "auto" and (CARRIED_TOKENIZER / "tokenizer.json.gz").is_file():
        folder = check.work / "tokenizer"
        folder.mkdir(exist_ok=True)
        packed = (CARRIED_TOKENIZER / "tokenizer.json.gz").read_bytes()
        (folder / "tokenizer.json").write_bytes(gzip.decompress(packed))
        shutil.copy(CARRIED_TOKENIZER / "tokenizer_config.json", folder)
        return str(folder), "SmolLM2's (carried in .whl/)"
    if choice == "auto":
        choice = str(SMOLLM2) if SMOLLM2.is_dir() else "tiny"
    return choice, "tiny_model.py's BPE" if choice == "tiny" else choice


def build_model(check: Check, timeout: float) -> dict:
    tokenizer, described = tokenizer_source(check)
    check.python(
        "build_model",
        "bench/gpu_phi2.py",
        *check.size.model,
        *("--build_only", "--keep_model", str(check.model), "--tokenizer", tokenizer),
        timeout=timeout,
    )
    config = json.loads((check.model / "config.json").read_text())
    parameters = safetensors_parameters(check.model)
    if not check.args.rehearsal and parameters != PHI2_PARAMETERS:
        raise StepError(f"the model has {parameters:,} parameters, Phi-2 {PHI2_PARAMETERS:,}")
    return {
        "parameters": parameters,
        "hidden_size": config["hidden_size"],
        "layers": config["num_hidden_layers"],
        "vocab_size": config["vocab_size"],
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "size_gb": round(sum(p.stat().st_size for p in check.model.glob("*.safetensors")) / 1e9, 2),
        "tokenizer": described,
        "tokenizer_vocabulary": len(json.loads((check.model / "tokenizer.json").read_text())["model"]["vocab"]),
    }


def bench(name: str, *flags: str):
    def run(check: Check, timeout: float) -> dict:
        out = check.files / f"{name}.json"
        size = check.size.bench if name == "bench" else check.size.extra_bench
        command = ["--model", str(check.model), *size, *flags, "--optim", check.optim, "--json", str(out)]
        check.python(name, "bench/gpu_phi2.py", *command, timeout=timeout)
        result = json.loads(out.read_text())
        keys = ("real_tokens_per_second", "mfu", "peak_memory_gib", "peak_reserved_gib", "useful_token_share")
        figures = {
            variant: {key: result[variant][key] for key in (*keys, "micro_batch", "max_length", "timed_steps")}
            for variant in ("original", "ours")
            if variant in result
        }
        figures["device"] = next(v["device"] for v in result.values() if isinstance(v, dict))
        if "tokens_per_second_ratio" in result:
            figures["tokens_per_second_ratio"] = result["tokens_per_second_ratio"]
        return figures

    return run


def train_args(check: Check, output_dir: Path, steps: int) -> list[str]:
    """train.py with its defaults (the Phi-2 recipe) on the random Phi-2 and the bundled sample."""
    return [
        *("--model", str(check.model), "--dataset", str(SAMPLE), "--eval_fraction", "0.1"),
        *("--output_dir", str(output_dir), "--max_steps", str(steps), "--max_length", str(check.size.max_length)),
        *("--logging_steps", "1", "--seed", "42", "--optim", check.optim),
    ]


def train(check: Check, timeout: float) -> dict:
    """Checkpoints every save_steps, SIGKILL just after checkpoint kill_at, --resume to the end with the report."""
    size, out, log = check.size, check.adapter, check.logs / "train.log"
    args = train_args(check, out, size.train_steps)
    args += ["--save_steps", str(size.save_steps), "--eval_strategy", "steps", "--eval_steps", str(size.save_steps)]
    args += size.report
    end = time.monotonic() + timeout
    target = out / f"checkpoint-{size.kill_at}" / "trainer_state.json"  # the Trainer writes it last
    with log.open("a") as log_file:
        log_file.write(f"$ {check.args.python} train.py {' '.join(args)}  (SIGKILL once {target} exists)\n")
    with log.open("a") as log_file:
        process = subprocess.Popen(
            [check.args.python, "train.py", *args],
            cwd=ROOT,
            env=check.step_env("train"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while process.poll() is None and not names_step(target, size.kill_at) and time.monotonic() < end:
            time.sleep(0.1)
        finished = process.poll()
        kill_group(process)
    if finished is not None:
        raise StepError(f"train.py ended (exit {finished}) before the kill: {last_error(log)}")
    if not names_step(target, size.kill_at):
        raise StepError(f"timed out before checkpoint-{size.kill_at}")
    figures = {
        "killed_after_checkpoint": size.kill_at,
        "checkpoints_at_kill": sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")),
    }
    try:
        check.python("train", "train.py", *args, "--resume", timeout=end - time.monotonic())
    except StepError as e:
        raise StepError(f"--resume: {e}", figures) from None
    resumed = re.findall(r"Resuming from \S*checkpoint-(\d+)", log.read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    report = json.loads((out / "eval.json").read_text())
    metrics = json.loads((out / "train_results.json").read_text())
    figures.update(
        {
            "resumed_from": int(resumed[-1]) if resumed else None,
            "global_step": state["global_step"],
            "losses": [round(v, 4) for v in losses],
            "eval_losses": [round(e["eval_loss"], 4) for e in state["log_history"] if "eval_loss" in e],
            "train_loss": round(metrics["train_loss"], 4),
            "train_runtime_s_after_resume": metrics["train_runtime"],
            "hardware": metrics.get("hardware"),
            "report": {
                side: {k: round(report[side][k], 4) for k in ("heldout_loss", "clean_stop_rate")}
                for side in ("base", "tuned")
            },
            "report_prompts": len(report["prompts"]),
            "heldout_examples": report["data"]["heldout_examples"],
            "files": sorted(p.name for p in out.iterdir()),
        }
    )
    for name in ("eval.json", "README.md", "loss.png", "train_results.json", "trainer_state.json"):
        if (out / name).is_file():
            (check.files / "train").mkdir(exist_ok=True)
            shutil.copy(out / name, check.files / "train" / name)
    if figures["resumed_from"] is None or figures["resumed_from"] < size.kill_at:
        raise StepError(f"--resume did not start from checkpoint-{size.kill_at} or later", figures)
    if state["global_step"] != size.train_steps or not all(map(math.isfinite, losses)):
        raise StepError(f"ended at step {state['global_step']} of {size.train_steps}, losses {losses}", figures)
    return figures


def train_fp16(check: Check, timeout: float) -> dict:
    """A short run with --fp16 true, the compute dtype left at auto: on a bf16 GPU it must follow to float16."""
    out = check.work / "train_fp16"
    args = train_args(check, out, check.size.precision_steps)
    args += ["--save_strategy", "no", "--eval_strategy", "no", "--final_report", "false", "--report_to", "none"]
    check.python("train_fp16", "train.py", *args, "--fp16", "true", timeout=timeout)
    state = json.loads((out / "trainer_state.json").read_text())
    history = [e for e in state["log_history"] if "loss" in e]
    metrics = json.loads((out / "train_results.json").read_text())
    computes = re.findall(r"The base computes in (\w+)\.", (check.logs / "train_fp16.log").read_text())
    figures = {
        "losses": [e["loss"] for e in history],
        "grad_norms": [e.get("grad_norm") for e in history],
        "train_runtime_s": metrics["train_runtime"],
        "compute_dtype": computes[-1] if computes else None,
        "run_config": {k: run_setting(out, k) for k in ("fp16", "bf16", "bnb_4bit_compute_dtype", "optim")},
    }
    if not history or not all(math.isfinite(e["loss"]) for e in history):
        raise StepError(f"non-finite or no loss: {figures['losses']}", figures)
    if figures["compute_dtype"] != ("float32" if check.args.rehearsal else "float16"):
        raise StepError(f"--fp16 true computed in {figures['compute_dtype']}, not float16", figures)
    return figures


def inference(check: Check, timeout: float) -> dict:
    folder = check.files / "inference"
    folder.mkdir(exist_ok=True)
    reply = folder / "oneshot.txt"
    prompt = PROMPTS[0]["prompt"]
    flags = ["--adapter", str(check.adapter), "--max_new_tokens", str(check.size.new_tokens), "--temperature", "0"]
    check.python("inference", "inference.py", prompt, *flags, timeout=timeout, stdout=reply)
    return {"prompt": prompt, "reply": reply.read_text()}


def inference_batch(check: Check, timeout: float) -> dict:
    prompts, answers = check.work / "prompts.jsonl", check.files / "inference" / "answers.jsonl"
    answers.parent.mkdir(exist_ok=True)
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    flags = ["--adapter", str(check.adapter), "--max_new_tokens", str(check.size.new_tokens), "--temperature", "0"]
    files = ["--input", str(prompts), "--output", str(answers), "--batch_size", "2"]
    check.python("inference_batch", "inference.py", *files, *flags, timeout=timeout)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    figures = {"answers": len(rows), "replies": [row.get("reply") for row in rows]}
    figures["stopped"] = [row.get("stopped", True) for row in rows]
    if [{k: v for k, v in row.items() if k in ("prompt", "messages")} for row in rows] != PROMPTS:
        raise StepError("the answers do not follow the prompts one for one, in order", figures)
    if not all(isinstance(reply, str) for reply in figures["replies"]):
        raise StepError("an answer has no reply", figures)
    return figures


def merge(check: Check, timeout: float) -> dict:
    merged = check.work / "merged"
    check.python("merge", "inference.py", "--merge-to", str(merged), "--adapter", str(check.adapter), timeout=timeout)
    config = json.loads((merged / "config.json").read_text())
    files = sorted(p.name for p in merged.iterdir())
    figures = {
        "files": files,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "parameters": safetensors_parameters(merged),
        "size_gb": round(sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 1e9, 2),
    }
    plain = "adapter_config.json" not in files and "tokenizer.json" in files
    if not plain or figures["parameters"] != safetensors_parameters(check.model):
        raise StepError("the merged folder is not a plain model of the base's size with its tokenizer", figures)
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, with its children; wait for it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def last_error(log: Path) -> str:
    """The line that says what went wrong: the last 'error: ...' or exception line of a log, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def names_step(trainer_state: Path, step: int) -> bool:
    """Whether a checkpoint's trainer_state.json is whole (it may be caught half-written) and names this step."""
    try:
        return json.loads(trainer_state.read_text()).get("global_step") == step
    except (OSError, ValueError):
        return False


def safetensors_parameters(folder: Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def run_setting(output_dir: Path, key: str):
    """One setting from a finished run's run_config.yaml (a flat 'key: value' mapping; no yaml import needed)."""
    for line in (output_dir / "run_config.yaml").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return None

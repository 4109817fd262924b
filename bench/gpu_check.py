"""The prepared GPU check: the whole Phi-2 QLoRA path on a CUDA GPU, in one command of about 7 minutes on an H200.

    bash bench/gpu_check.sh                   # on the GPU machine: installs .whl/ (make gpu-wheels), then this
    bash bench/gpu_check.sh --rehearsal       # every step at tiny size on CPU (tests/test_gpu_check.py runs it)
    python bench/gpu_check.py --help          # the options (gpu_check.sh passes its arguments on)

Every step runs the repo's own entry points in processes of their own, so a failing step leaves the others' figures:

1. environment: versions, the GPU, nvidia-smi, bitsandbytes' native library and an nf4 round trip on the device;
   it fails if the training stack is outside requirements.txt, and warns about any other package outside its range
   there or outside a carried wheel's own requirements (the wheels are installed without their dependencies);
2. probes: bench/gpu_probes.py, in seconds, the CUDA-only library code the training steps meet (paged AdamW, TRL's
   chunked log-prob kernel in bf16 and fp16, a Linear4bit + LoRA backward), each checked against float32 torch; when
   paged AdamW fails there, the later steps train with adamw_torch (and the JSON says so);
   beside it, build_model: bench/gpu_phi2.py writes a random Phi-2 at its exact size (bf16, 5.6 GB) with SmolLM2's
   tokenizer;
3. bench: bench/gpu_phi2.py on it, the original recipe's batching against ours at 512 tokens x micro-batch 4 (real
   tokens/s, MFU, peak allocated and reserved memory), each variant in its own process;
4. train: `train.py` with the default Phi-2 settings (4-bit nf4 + double quantization, bf16 on this GPU, paged AdamW,
   packing, gradient checkpointing) on that model and the bundled oasst1 sample (--eval_fraction), checkpoints on the
   way, killed with SIGKILL just after a checkpoint, then `--resume` to the end; the final report runs inside
   train.py; beside it, train_fp16 (`--fp16 true`, the compute dtype left to follow it): a short run, recorded apart;
5. inference: `inference.py` one-shot (streamed) and batch (--input/--output), and `--merge-to`, on the adapter of 4;
6. if time remains: bench_mb8, bench_mb16, bench_no_gc: our batching at micro-batch 8 and 16, and without gradient
   checkpointing (peak memory and tokens/s).

Steps in one numbered group run side by side (2, 4 and 5: no timings of their own), except the timed ones (3 and 6),
which run alone on a GPU; in the rehearsal their timings mean nothing, so they run side by side too.
--budget bounds the whole check: a step never runs past it, and an optional step starts only if its usual time
still fits. Writes three files to --out (gpu_check.sh: $OUT, else artifacts/gpu_check; the device tool brings back
8 at most): gpu_check.json (every step's status, seconds, figures and error), gpu_check.log (gpu_check.sh's whole
output) and gpu_check_files.tar.gz (the step logs, logs/STEP.log, and the small files the steps write: bench JSON,
the report's eval.json, model card and loss plot, the batch answers). The JSON and the archive are rewritten after
every step, so a run cut off keeps what it measured. Models, checkpoints and the merged model stay in --work (a new
temporary folder by default, removed at the end; the archive's files are in its files/ until then).

--rehearsal: the same steps on a tiny Phi-2 (gpu_phi2.py --tiny) on CPU, with short sequences and a few steps each;
the probes run what has a CPU path and list what they skipped. On CPU the fp16 run trains in float32 (train.py's CPU
rule), so only a GPU run says anything about fp16.
"""

import argparse
import datetime
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench_utils import SAMPLE, SMOLLM2
from gpu_wheels import WHEELS

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = "gpu_check_files.tar.gz"
CARRIED_TOKENIZER = ROOT / ".whl" / "tokenizer"  # make gpu-wheels puts SmolLM2's tokenizer here
PHI2_PARAMETERS = 2_779_683_840
QLORA_QUESTION = {"role": "user", "content": "What is QLoRA?"}
PROMPTS = [
    {"prompt": "How do I make a good cup of tea?"},
    {"prompt": "Name three uses of a paperclip."},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, QLORA_QUESTION]},
]
# The goals of issue 13 for the run on a GPU (from bench, ours at 512 tokens x micro-batch 4).
GOALS = {
    "peak_allocated_gb": ("peak allocated memory, ours (GB)", "<=", 6.0),
    "tokens_per_second_ratio": ("real tokens/s, ours / original", ">=", 2.0),
    "mfu": ("MFU, ours (4N FLOPs per real token)", ">=", 0.35),
}


@dataclass
class Size:
    """What differs between the run on a GPU and the rehearsal on CPU."""

    model: list[str]  # gpu_phi2.py's size flag
    probes: list[str]  # gpu_probes.py's size flag
    bench: list[str]  # gpu_phi2.py's step count and row length
    extra_bench: list[str]
    max_length: int
    train_steps: int
    save_steps: int
    kill_at: int  # the train step's SIGKILL lands just after this checkpoint is complete
    report: list[str]
    precision_steps: int
    new_tokens: int


# The two sizes side by side: the real check on the GPU, and its rehearsal at tiny size on CPU.
SIZES = {
    "model": ([], ["--tiny", "--vocabulary_of_tokenizer"]),
    "probes": ([], ["--tiny"]),
    "bench": (["--steps", "20", "--warmup", "3"], ["--steps", "2", "--warmup", "1", "--max_length", "128"]),
    "extra_bench": (["--steps", "10", "--warmup", "2"], ["--steps", "1", "--warmup", "1", "--max_length", "128"]),
    "max_length": (512, 128),
    "train_steps": (30, 6),
    "save_steps": (10, 2),
    "kill_at": (20, 4),
    "report": (
        ["--report_prompts", "2", "--report_max_new_tokens", "32"],
        ["--report_prompts", "2", "--report_max_new_tokens", "4"],
    ),
    "precision_steps": (6, 2),
    "new_tokens": (32, 8),
}
GPU = Size(**{name: sizes[0] for name, sizes in SIZES.items()})
REHEARSAL = Size(**{name: sizes[1] for name, sizes in SIZES.items()})


class StepError(Exception):
    """A step failed: the message says how, in one line."""


class Check:
    """The run's settings, folders, clock and results; every step gets it."""

    def __init__(self, args):
        self.args = args
        self.size = REHEARSAL if args.rehearsal else GPU
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        for earlier in ("files", "phi2", "tokenizer", "train", "train_fp16", "merged"):
            shutil.rmtree(self.work / earlier, ignore_errors=True)  # a --work folder used before starts afresh
        # The step logs and small outputs; they reach --out as one archive (the device tool returns 8 files at most).
        self.files = self.work / "files"
        self.logs = self.files / "logs"
        self.logs.mkdir(parents=True)
        self.model = self.work / "phi2"
        self.adapter = self.work / "train"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.lock = threading.Lock()
        self.threads: dict[str, int] = {}  # CPU threads per step, when steps run side by side
        self.optim = "paged_adamw_32bit"  # the recipe's; the probes step turns it into adamw_torch if it fails there
        self.result = {
            "kind": "rehearsal (tiny Phi-2 on CPU)" if args.rehearsal else "GPU",
            "started": now(),
            "source": source(),
            "budget_s": args.budget,
            "optim": {"optim": self.optim, "from": "the recipe (no probe said otherwise)"},
            "steps": {},
        }
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",  # the GPU machine has no network: nothing may wait on the Hub
            "HF_DATASETS_OFFLINE": "1",
        }

    def step_env(self, step: str) -> dict:
        """Steps side by side share the cores: torch's threads would otherwise spin against each other (measured on
        2 cores: three training processes with a thread per core each ran 16 times slower than one alone)."""
        if step in self.threads and "OMP_NUM_THREADS" not in os.environ:
            return {**self.env, "OMP_NUM_THREADS": str(self.threads[step])}
        return self.env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, command: list[str], timeout: float, stdout: Path | None = None) -> int:
        """Run a command from the repo root, its output appended to the step's log (stdout to a file of its own when
        given); kill it and its children at the timeout."""
        with (self.logs / f"{step}.log").open("a") as log:
            shown = " ".join("'...'" if "\n" in arg else arg for arg in command)  # a -c program is in this file
            log.write(("\n" if log.tell() else "") + f"$ {shown}\n")  # a killed run's output can end mid-line
            log.flush()
            with open(stdout, "w") if stdout else open(os.devnull) as out:
                process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=self.step_env(step),
                    stdout=out if stdout else log,
                    stderr=log,
                    start_new_session=True,  # its own process group: a timeout kills its children too
                )
                try:
                    return process.wait(timeout=max(timeout, 1))
                except subprocess.TimeoutExpired:
                    kill_group(process)
                    raise StepError(f"timed out after {timeout:.0f} s: {' '.join(command[:3])} ...") from None

    def python(self, step: str, script: str, *args: str, timeout: float, stdout: Path | None = None) -> None:
        code = self.run(step, [self.args.python, script, *args], timeout, stdout)
        if code != 0:
            raise StepError(f"{script} exited with {code}: {last_error(self.logs / f'{step}.log')}")

    def save(self) -> None:
        """gpu_check.json and the archive in --out, rewritten after every step (a run cut off keeps them)."""
        with self.lock:
            self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
            self.result["goals"] = goals(self.result["steps"], self.args.rehearsal)
            path = self.out / "gpu_check.json"
            path.with_suffix(".tmp").write_text(json.dumps(self.result, indent=2) + "\n")
            path.with_suffix(".tmp").replace(path)
            archive = self.out / ARCHIVE
            try:
                with tarfile.open(archive.with_suffix(".tmp"), "w:gz") as tar:
                    tar.add(self.files, arcname=".")
            except OSError as e:  # a file changed under tarfile's feet: the next save has it
                print(f"(could not write {archive.name} this time: {e})", flush=True)
            else:
                archive.with_suffix(".tmp").replace(archive)


@dataclass
class Step:
    name: str
    run: object  # (check, timeout) -> figures; raises StepError
    estimate_s: float  # its usual time on the H200, as planned (the log gives the real ones)
    timeout_s: float
    needs_model: bool = True
    needs_adapter: bool = False
    optional: bool = False  # only if its estimate still fits the budget
    note: str = field(default="")


# ---------------------------------------------------------------------------------------------------------------
# The steps


ENV_PROBE = r"""
import importlib.metadata as md, json, platform, sys
from packaging.requirements import Requirement

from packaging.utils import canonicalize_name

# Outside its requirements.txt range, a package of the training stack fails the step; any other mismatch is a warning.
CORE = ["torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface-hub"]
OTHER = ["tqdm", "pyyaml", "tensorboard", "matplotlib", "pyarrow"]  # the rest of what train.py and report.py use
CARRIED = sys.argv[1].split(",")

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

def unmet(req, found):
    return found is None or not req.specifier.contains(found, prereleases=True)

out = {"python": platform.python_version(), "versions": {n: version(n) for n in dict.fromkeys(CORE + OTHER + CARRIED)}}
out["unmet_requirements"], out["warnings"] = [], []
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if line and canonicalize_name(Requirement(line).name) in CORE + OTHER:
        req = Requirement(line)
        if unmet(req, version(req.name)):
            kind = "unmet_requirements" if canonicalize_name(req.name) in CORE else "warnings"
            out[kind].append(f"requirements.txt: {req} (found {version(req.name)})")
for name in CARRIED:  # installed with --no-deps: what they need, against what is there
    for text in md.requires(name) or [] if version(name) else []:
        req = Requirement(text)
        if (not req.marker or req.marker.evaluate({"extra": ""})) and unmet(req, version(req.name)):
            out["warnings"].append(f"{name} needs {req} (found {version(req.name)})")

def probe():  # the imports and the GPU: what fails here is recorded, the versions above are kept
    import torch
    import transformers, trl, peft, datasets, accelerate, bitsandbytes, huggingface_hub
    import bitsandbytes.functional as F
    from bitsandbytes import cextension

    modules = (torch, transformers, trl, peft, datasets, bitsandbytes, huggingface_hub)
    out["module_paths"] = {m.__name__: m.__file__ for m in modules}  # /tmp/site/... for the carried ones
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = torch.cuda.get_device_name()
        out["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        out["compute_capability"] = f"{p.major}.{p.minor}"
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    out["bnb_backend"] = cextension.BNB_BACKEND
    library = getattr(cextension.lib, "__dict__", {}).get("_lib")
    out["bnb_library"] = library._name.rsplit("/", 1)[-1] if library is not None else None
    out["bnb_cuda_library"] = bool(getattr(cextension.lib, "compiled_with_cuda", False))
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    torch.manual_seed(0)
    x = torch.randn(512, 512, device=device, dtype=dtype)
    packed, state = F.quantize_4bit(x, quant_type="nf4", blocksize=64)
    error = (F.dequantize_4bit(packed, state) - x).abs().float().mean().item()
    out["nf4_roundtrip_mean_abs_error"] = round(error, 4)

try:
    probe()
except Exception as e:
    out["import_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def environment(check: Check, timeout: float) -> dict:
    figures = {}
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, flush=True)
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        figures["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    probe = check.logs / "environment.json"
    check.python("environment", "-c", ENV_PROBE, ",".join(WHEELS), timeout=timeout, stdout=probe)
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


# Planned seconds on the H200 (estimate_s): the steps that always run add up to about 325 of the 420 s budget
# (probes beside build_model, train_fp16 beside train), which leaves room for a slow step and some optional ones;
# bench/gpu_check.sh is given 540 s, for the wheels' install and the summary on top.
GPU_BUDGET_S = 420.0
STEPS = [
    [Step("environment", environment, 15, 180, needs_model=False)],
    [Step("probes", probes, 30, 150, needs_model=False), Step("build_model", build_model, 40, 300, needs_model=False)],
    [Step("bench", bench("bench"), 80, 300)],
    [Step("train", train, 150, 480), Step("train_fp16", train_fp16, 45, 240)],
    [
        Step("inference", inference, 30, 180, needs_adapter=True),
        Step("inference_batch", inference_batch, 30, 180, needs_adapter=True),
        Step("merge", merge, 40, 240, needs_adapter=True),
    ],
    [
        Step("bench_mb8", bench("bench_mb8", "--variants", "ours", "--micro_batch", "8"), 40, 180, optional=True),
        Step("bench_mb16", bench("bench_mb16", "--variants", "ours", "--micro_batch", "16"), 50, 180, optional=True),
        Step(
            "bench_no_gc",
            bench("bench_no_gc", "--variants", "ours", "--activation_checkpointing", "false"),
            40,
            180,
            optional=True,
        ),
    ],
]
TIMED = {"bench", "bench_mb8", "bench_mb16", "bench_no_gc"}  # on a GPU these run alone; on CPU they mean nothing


# ---------------------------------------------------------------------------------------------------------------
# Running them


def new_record(step: Step) -> dict:
    record = {"status": "pending", "seconds": 0.0, "error": None, "figures": {}, "log": f"logs/{step.name}.log"}
    return {**record, "note": step.note} if step.note else record


def run_step(check: Check, step: Step) -> None:
    record = new_record(step)
    remaining = check.remaining()
    built = check.result["steps"].get("build_model", {}).get("status") == "passed"
    if step.needs_model and not built:
        record["error"] = "no model: build_model did not pass"
    elif step.needs_adapter and not any(check.adapter.glob("**/adapter_config.json")):
        record["error"] = "no adapter: the train step left none"
    elif remaining < 10 or (step.optional and remaining < step.estimate_s):
        record["error"] = f"no time left ({remaining:.0f} s of the --budget)"
    else:
        print(f"[{check_time(check)}] {step.name} ...", flush=True)
        with check.lock:
            check.result["steps"][step.name] = {**record, "status": "running"}
        timeout = remaining if check.args.rehearsal else min(step.timeout_s, remaining)
        start = time.monotonic()
        try:
            record["figures"] = step.run(check, timeout)
            record["status"] = "passed"
        except StepError as e:
            record["status"], record["error"] = "failed", e.args[0]
            if len(e.args) > 1:
                record["figures"] = e.args[1]
        except Exception as e:  # a bug or a missing file in the check itself: recorded, the other steps go on
            record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
        record["seconds"] = round(time.monotonic() - start, 1)
    if record["status"] == "pending":
        record["status"] = "skipped"
    with check.lock:
        check.result["steps"][step.name] = record
    print(
        f"[{check_time(check)}] {step.name}: {record['status']} ({record['seconds']:.0f} s)"
        + (f": {record['error']}" if record["error"] else ""),
        flush=True,
    )
    if record["status"] == "failed":
        tail = (check.logs / f"{step.name}.log").read_text(errors="replace").splitlines()[-15:]
        print("    " + "\n    ".join(tail), flush=True)
    check.save()


def goals(steps: dict, rehearsal: bool) -> dict:
    """Issue 13's goals for a GPU run, from the bench step (on CPU they are computed the same way, but mean nothing:
    no MFU without a GPU peak, and RSS instead of CUDA memory)."""
    bench_figures = steps.get("bench", {}).get("figures", {})
    ours = bench_figures.get("ours", {})
    peak_gib = ours.get("peak_memory_gib")
    values = {
        "peak_allocated_gb": None if peak_gib is None else round(peak_gib * 2**30 / 1e9, 2),
        "tokens_per_second_ratio": bench_figures.get("tokens_per_second_ratio"),
        "mfu": ours.get("mfu"),
    }
    result = {}
    for key, (label, relation, target) in GOALS.items():
        value = values[key]
        met = None if value is None else (value <= target if relation == "<=" else value >= target)
        result[key] = {"goal": f"{label} {relation} {target}", "value": value, "met": met}
    ran = [s for s in steps.values() if s["status"] != "skipped"]
    result["every_step_passed"] = {
        "goal": "every step of the check passes",
        "value": f"{sum(s['status'] == 'passed' for s in steps.values())} of {len(steps)} passed",
        "met": bool(ran) and all(s["status"] == "passed" for s in steps.values()),
    }
    if rehearsal:
        result["note"] = "rehearsal on CPU: the goals are for a GPU run"
    return result


def summary(check: Check) -> None:
    print(f"\nGPU check ({check.result['kind']}), {check.result['elapsed_s']:.0f} s:")
    for name, record in check.result["steps"].items():
        print(f"  {name:<16}{record['status']:<8}{record['seconds']:>6.0f} s  {brief(name, record)}")
    for goal in check.result["goals"].values():
        if isinstance(goal, dict):
            verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
            print(f"  goal: {goal['goal']}: {goal['value']} ({verdict})")
    if "note" in check.result["goals"]:
        print(f"  ({check.result['goals']['note']})")
    print(f"figures: {check.out / 'gpu_check.json'}; logs and files: {check.out / ARCHIVE}")


def brief(name: str, record: dict) -> str:
    """The step's main figures in one line."""
    f = record["figures"]
    if record["status"] == "skipped" or not f:
        return record["error"] or ""
    if name.startswith("bench"):
        return "; ".join(
            f"{v} {f[v]['real_tokens_per_second']} tok/s, MFU {f[v]['mfu']}, peak {f[v]['peak_memory_gib']} GiB"
            f" (reserved {f[v]['peak_reserved_gib']})"
            for v in ("original", "ours")
            if v in f
        ) + (f"; ratio {f['tokens_per_second_ratio']}x" if "tokens_per_second_ratio" in f else "")
    if name == "environment":
        return f"{f.get('device', 'no GPU')}, torch {f['versions']['torch']}, bnb {f.get('bnb_library')}"
    if name == "build_model":
        return f"{f['parameters']:,} parameters, {f['size_gb']} GB, tokenizer {f['tokenizer']}"
    if name == "train":
        return (
            f"killed after checkpoint-{f['killed_after_checkpoint']}, resumed from {f.get('resumed_from')}, "
            f"step {f.get('global_step')}, train loss {f.get('train_loss')}, report {f.get('report')}"
        )
    if name == "train_fp16":
        return f"computes in {f['compute_dtype']}, losses {f['losses']}"
    if name == "probes":
        passed = [n for n, r in f["probes"].items() if r["status"] == "passed"]
        skipped = ", ".join(f["skipped"]) or "none"
        return f"{len(passed)} of {len(f['probes'])} passed; optimizer {f['optim']}; skipped {skipped}"
    if name == "merge":
        return f"{f['parameters']:,} parameters, {f['dtype']}, {f['size_gb']} GB"
    if name == "inference":
        return f"reply {f['reply'][:60]!r}"
    if name == "inference_batch":
        return f"{f['answers']} answers"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_time(check: Check) -> str:
    return f"{time.monotonic() - check.start:5.0f} s"


def source() -> dict:
    """The commit that runs: from git where there is one, else what `make gpu-wheels` recorded (the device's copy of
    the working tree has no .git)."""
    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], **git).stdout.strip())
        return {"commit": commit, "dirty": dirty, "from": "git"}
    except (OSError, subprocess.CalledProcessError):
        recorded = ROOT / ".whl" / "source.json"
        if recorded.is_file():
            return {**json.loads(recorded.read_text()), "from": "make gpu-wheels (.whl/source.json)"}
        return {"commit": None, "from": "unknown: no .git and no .whl/source.json"}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearsal", action="store_true", help="Every step at tiny size on CPU.")
    parser.add_argument("--out", default="artifacts/gpu_check", help="Figures, logs and small outputs go here.")
    parser.add_argument("--work", help="Models and checkpoints go here (default: a new temporary folder).")
    parser.add_argument("--keep_work", action="store_true", help="Keep --work afterwards (it holds 15 GB on a GPU).")
    parser.add_argument("--budget", type=float, help="Seconds for all steps (default: 420 on a GPU, 1800 rehearsal).")
    parser.add_argument("--only", help="Run only these steps, comma-separated (build_model is added when needed).")
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="Tokenizer of the random Phi-2: a folder, 'tiny' (tiny_model.py's BPE), or auto (SmolLM2's, carried in "
        ".whl/ by make gpu-wheels or in cache/, else tiny).",
    )
    parser.add_argument("--python", default=sys.executable, help="The Python that runs the steps.")
    args = parser.parse_args(argv)
    args.budget = args.budget or (1800.0 if args.rehearsal else GPU_BUDGET_S)
    stages = STEPS
    if args.only:
        wanted = set(args.only.split(","))
        known = {step.name for stage in STEPS for step in stage}
        if wanted - known:
            parser.error(f"unknown steps {sorted(wanted - known)}; the steps: {', '.join(sorted(known))}")
        if any(step.needs_model for stage in STEPS for step in stage if step.name in wanted):
            wanted.add("build_model")
        stages = [[step for step in stage if step.name in wanted] for stage in STEPS]
        stages = [stage for stage in stages if stage]

    check = Check(args)
    check.result["steps"] = {step.name: new_record(step) for stage in stages for step in stage}
    print(f"GPU check ({check.result['kind']}): work in {check.work}, figures in {check.out}", flush=True)
    check.save()
    try:
        for stage in stages:
            if args.rehearsal or not TIMED & {step.name for step in stage}:
                side_by_side = [stage]
                if len(stage) > 1:
                    check.threads.update({step.name: max(1, (os.cpu_count() or 1) // len(stage)) for step in stage})
            else:
                side_by_side = [[step] for step in stage]  # one after the other, in the order given
            for group in side_by_side:
                with ThreadPoolExecutor(len(group)) as pool:
                    list(pool.map(lambda step: run_step(check, step), group))
    finally:
        check.result["finished"] = now()
        check.save()
        if not args.keep_work and not args.work:
            shutil.rmtree(check.work, ignore_errors=True)
    summary(check)
    return 0 if all(s["status"] == "passed" for s in check.result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

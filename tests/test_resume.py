"""Crash-safe training: kill -9 anywhere, Ctrl-C / SIGTERM, and a finished run that is never overwritten.

Every run here is the same 6-step 4-bit QLoRA run of the tiny Phi model (LoRA dropout on, so the RNG state matters),
saving a checkpoint at every step. An interrupted run, resumed, must end with the adapter of the uninterrupted run.
"""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train
from checkpoint_utils import checkpoint_step, checkpoints, is_complete_checkpoint, latest_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 6

# Runs train.py with every torch.save (optimizer, scheduler, RNG state, training args) slowed down by 0.2 s, which
# widens a checkpoint save to about a second so that a kill can land between its files. Nothing else changes.
SLOW_SAVES = """
import runpy, sys, time, torch
save = torch.save
def slow_save(*args, **kwargs):
    time.sleep(0.2)
    return save(*args, **kwargs)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def run_args(tiny_phi, tmp_path_factory):
    data = tmp_path_factory.mktemp("resume-data") / "chat.jsonl"
    pairs = [("Is water wet?", "Yes."), ("Do cats purr?", "Yes, they do."), ("Is the sky green?", "No, blue.")]
    pairs += [("Are you a robot?", "No."), ("Can fish fly?", "Some can glide."), ("Is ice cold?", "Yes.")]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs
        )
    )
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--eval_split", "", "--max_steps", str(MAX_STEPS)]
    args += ["--save_steps", "1", "--logging_steps", "1", "--lora_r", "4", "--lora_dropout", "0.1"]
    args += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "0.001"]
    args += ["--report_to", "none", "--final_report", "false", "--seed", "42"]
    return args


@pytest.fixture(scope="module")
def reference(run_args, tmp_path_factory):
    """The uninterrupted run: its output folder."""
    out = tmp_path_factory.mktemp("reference") / "model"
    train.main([*run_args, "--output_dir", str(out)])
    return out


def max_abs_diff(adapter_dir: Path, reference_dir: Path) -> float:
    a, b = load_file(adapter_dir / "adapter_model.safetensors"), load_file(reference_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)  # same weights, same precision
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def start(args: list[str], log: Path, slow_saves: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-c", SLOW_SAVES, *args] if slow_saves else [sys.executable, "train.py", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"train.py ended (exit {process.returncode}) before it was interrupted:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for train.py:\n{log.read_text()}")
        time.sleep(0.005)


def refusal(args: list[str], capsys) -> str:
    """What train.main prints when it refuses these arguments: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(run_args, reference, tmp_path):
    out = tmp_path / "model"
    args = [*run_args, "--output_dir", str(out)]
    rng = random.Random(6)  # the kill points are reproducible; they are printed (pytest -s, or shown on failure)
    steps = sorted(rng.sample(range(1, MAX_STEPS), 3))
    kills = [(step, rng.choice(["mid-save", "mid-step"]), rng.uniform(0.0, 0.5)) for step in steps]
    kills[0] = (kills[0][0], "mid-save", kills[0][2])  # at least one kill lands inside a save
    for attempt, (step, where, delay) in enumerate(kills):
        log = tmp_path / f"attempt-{attempt}.log"
        started = time.time()
        resume = latest_checkpoint(out) is not None  # as a user would: a kill in the first save left nothing to resume
        process = start([*args, "--resume"] if resume else args, log, slow_saves=True)
        folder = out / f"checkpoint-{step}"
        if where == "mid-save":  # this process has created the checkpoint folder and is writing its files
            wait_for(lambda f=folder, t=started: f.is_dir() and f.stat().st_mtime >= t, process, log)
        else:  # the checkpoint is complete; the next step is running
            wait_for(lambda f=folder: is_complete_checkpoint(f), process, log)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        found = {p.name: sorted(f.name for f in p.iterdir()) for p in checkpoints(out)}
        print(f"kill -9 #{attempt} {where} of step {step} after {delay:.2f} s; checkpoints left: {found}")
        latest = latest_checkpoint(out)
        complete = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
        assert latest == (complete[-1] if complete else None)  # the newest complete one, never a partial one
        if where == "mid-save":
            assert not is_complete_checkpoint(folder)  # a save cut short is detected...
            assert (checkpoint_step(latest) if latest else 0) == step - 1  # ...and skipped
    train.main([*args, "--resume"])
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{s}" for s in range(MAX_STEPS - 2, MAX_STEPS + 1)]
    difference = max_abs_diff(out, reference)
    print(f"max abs difference to the uninterrupted run: {difference}")
    assert difference == 0.0  # bit-identical (CPU, same seed; the 4-bit base's bf16 LoRA weights kept in bf16)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(signum, run_args, reference, tmp_path):
    out = tmp_path / "model"
    log = tmp_path / "train.log"
    process = start([*run_args, "--output_dir", str(out)], log)
    wait_for(lambda: is_complete_checkpoint(out / "checkpoint-2"), process, log)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    output = log.read_text()
    assert "Traceback" not in output
    stopped_at = latest_checkpoint(out)
    assert f"Stopped by {signal.Signals(signum).name} at step {checkpoint_step(stopped_at)}" in output
    assert 2 <= checkpoint_step(stopped_at) < MAX_STEPS
    assert not (out / "run_config.yaml").exists() and not (out / "adapter_config.json").exists()  # not finished
    # The printed command continues the run to the same adapter as the uninterrupted run.
    command = shlex.split(output.split("Continue with:\n  python ")[1].splitlines()[0])
    assert command[0] == "train.py" and command[-1] == "--resume"
    train.main(command[1:])
    assert max_abs_diff(out, reference) == 0.0


def test_a_finished_run_is_never_overwritten(run_args, reference, snapshot, capsys):
    before = snapshot(reference)
    assert refusal([*run_args, "--output_dir", str(reference)], capsys) == (
        f"error: {reference} holds a finished run: pass --overwrite to replace it, --resume with a larger "
        "--max_steps to extend it, or choose another --output_dir.\n"
    )
    assert snapshot(reference) == before


def test_checkpoints_without_a_final_adapter_ask_for_resume(run_args, reference, tmp_path, snapshot, capsys):
    out = tmp_path / "model"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-5", out / "checkpoint-5")
    before = snapshot(out)
    assert refusal([*run_args, "--output_dir", str(out)], capsys) == (
        f"error: {out} holds the checkpoints of an unfinished run (up to checkpoint-5): continue it with --resume, "
        "or pass --overwrite to start over.\n"
    )
    assert snapshot(out) == before


def test_overwrite_replaces_the_previous_run(run_args, reference, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    train.main([*run_args, "--output_dir", str(out), "--max_steps", "2", "--overwrite"])
    # The old run's checkpoints 4-6 are gone (--resume would have picked checkpoint-6); the new run's adapter is there.
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert max_abs_diff(out, out / "checkpoint-2") == 0.0 and max_abs_diff(out, reference) > 0
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are touched


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints of other launches, and damaged ones: kept, and a one-line answer


def fsdp_checkpoint(source: Path, dest: Path, layout: str) -> Path:
    """A copy of a checkpoint as a 2-process FSDP run writes it, with accelerate's file names (save_fsdp_model and
    save_fsdp_optimizer): the full state dict (pytorch_model_fsdp.bin, optimizer.bin) or the sharded one (folders of
    torch.distributed.checkpoint shards); one RNG state per process."""
    import torch
    import torch.distributed.checkpoint as dcp

    shutil.copytree(source, dest)
    optimizer = torch.load(dest / "optimizer.pt", weights_only=True)
    (dest / "optimizer.pt").unlink()
    if layout == "full state dict":
        torch.save(optimizer, dest / "optimizer.bin")
        torch.save(load_file(dest / "adapter_model.safetensors"), dest / "pytorch_model_fsdp.bin")
    else:
        names = {index: f"lora_{index}" for index in optimizer["state"]}  # FSDP keys the states by parameter name
        state = {names[index]: values for index, values in optimizer["state"].items()}
        groups = [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer["param_groups"]]
        dcp.save({"optimizer": {"state": state, "param_groups": groups}}, checkpoint_id=dest / "optimizer_0")
        dcp.save(dict(load_file(dest / "adapter_model.safetensors")), checkpoint_id=dest / "pytorch_model_fsdp_0")
    (dest / "rng_state.pth").rename(dest / "rng_state_0.pth")
    shutil.copy(dest / "rng_state_0.pth", dest / "rng_state_1.pth")
    return dest


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save in one process
@pytest.mark.parametrize("layout", ["full state dict", "sharded"])
def test_fsdp_checkpoints_are_complete_kept_by_a_fresh_start_and_resumed_under_fsdp(
    layout, run_args, reference, tmp_path, snapshot, capsys, monkeypatch
):
    from checkpoint_utils import check_output_dir, remove_interrupted_saves

    out = tmp_path / "model"
    checkpoint = fsdp_checkpoint(reference / "checkpoint-6", out / "checkpoint-6", layout)
    assert is_complete_checkpoint(checkpoint) and latest_checkpoint(out) == checkpoint
    before = snapshot(out)
    # A fresh start asks for --resume (it used to delete the checkpoint as a save cut short).
    assert refusal([*run_args, "--output_dir", str(out)], capsys) == (
        f"error: {out} holds the checkpoints of an unfinished run (up to checkpoint-6): continue it with --resume, "
        "or pass --overwrite to start over.\n"
    )
    # --resume without FSDP would fail in the Trainer (it reads optimizer.pt): one line instead.
    assert refusal([*run_args, "--output_dir", str(out), "--max_steps", "8", "--resume"], capsys) == (
        f"error: --resume: {checkpoint} was saved under FSDP (accelerate's optimizer files): resume it as it was "
        "launched, with accelerate launch and its FSDP config.\n"
    )
    assert snapshot(out) == before
    # Under accelerate launch with FSDP (which sets this variable in every process), --resume takes it.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert check_output_dir(out, resume=True) == checkpoint
    # Before training, only a save cut short (no trainer_state.json) is removed.
    (out / "checkpoint-7").mkdir()
    shutil.copy(checkpoint / "adapter_model.safetensors", out / "checkpoint-7")
    remove_interrupted_saves(out, checkpoint)
    assert snapshot(out) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


ZIP_CUT_SHORT = "not a whole torch.save archive: File is not a zip file"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_names_a_damaged_file_and_the_checkpoint_before_it(
    name, run_args, reference, tmp_path, snapshot, capsys, caplog
):
    out = tmp_path / "model"
    shutil.copytree(reference, out)
    truncate(out / "checkpoint-6" / name)
    before = snapshot(out)
    args = [*run_args, "--output_dir", str(out), "--max_steps", "8", "--resume"]
    assert refusal(args, capsys) == (
        f"error: --resume: {out / 'checkpoint-6' / name} is damaged ({ZIP_CUT_SHORT}); nothing was deleted: move "
        f"{out / 'checkpoint-6'} out of {out}, and --resume continues from checkpoint-5.\n"
    )
    assert snapshot(out) == before
    if name != "optimizer.pt":
        return
    # Doing what it says continues the run from checkpoint-5 to the new end.
    (out / "checkpoint-6").rename(tmp_path / "checkpoint-6")
    with caplog.at_level("INFO"):
        trainer, _ = train.main(args)
    assert f"Resuming from {out / 'checkpoint-5'}" in caplog.messages
    assert trainer.state.global_step == 8 and is_complete_checkpoint(out / "checkpoint-8")


def test_resume_without_a_readable_checkpoint_says_to_start_over(run_args, reference, tmp_path, snapshot, capsys):
    out = tmp_path / "model"
    shutil.copytree(reference, out)
    for checkpoint in checkpoints(out):
        truncate(checkpoint / "optimizer.pt")
    before = snapshot(out)
    assert refusal([*run_args, "--output_dir", str(out), "--max_steps", "8", "--resume"], capsys) == (
        f"error: --resume: {out / 'checkpoint-6' / 'optimizer.pt'} is damaged ({ZIP_CUT_SHORT}); nothing was "
        "deleted: no older checkpoint can be resumed: pass --overwrite instead of --resume to start over.\n"
    )
    assert snapshot(out) == before


def test_a_finished_save_that_lacks_a_file_is_kept_and_named(run_args, reference, tmp_path, snapshot, capsys):
    out = tmp_path / "model"
    for step in (5, 6):
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6" / "scheduler.pt").unlink()
    assert not is_complete_checkpoint(out / "checkpoint-6") and latest_checkpoint(out) == out / "checkpoint-5"
    before = snapshot(out)
    fresh_start = refusal([*run_args, "--output_dir", str(out)], capsys)
    assert "holds the checkpoints of an unfinished run (up to checkpoint-6)" in fresh_start
    assert refusal([*run_args, "--output_dir", str(out), "--resume"], capsys) == (
        f"error: --resume: {out / 'checkpoint-6'} lacks the scheduler state; nothing was deleted: move "
        f"{out / 'checkpoint-6'} out of {out}, and --resume continues from checkpoint-5.\n"
    )
    assert snapshot(out) == before

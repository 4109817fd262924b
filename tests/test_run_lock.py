"""One run per output folder (run_lock.py): a second run on a folder that a run is training into ends at once, in one
line that names the running process, and writes nothing; a run killed with kill -9 leaves a lock file that --resume
takes over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
import train_settings  # noqa: F401  (TRL loaded before the refusal is timed: what it costs is parsing and the lock)
from checkpoint_utils import is_complete_checkpoint
from run_lock import LOCK_FILE, output_dir_lock

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # a checkpoint every step: the tests act at checkpoint-2, with the run far from its end


@pytest.fixture(scope="module")
def run_args(tiny_phi, tmp_path_factory):
    data = tmp_path_factory.mktemp("lock-data") / "chat.txt"
    data.write_text("".join(f"### Human: Question {n}? ### Assistant: Answer {n}.\n" for n in range(8)))
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--eval_split", "", "--max_steps", str(STEPS)]
    args += ["--save_steps", "1", "--lora_r", "4", "--per_device_train_batch_size", "2", "--packing", "false"]
    return [*args, "--gradient_accumulation_steps", "1", "--report_to", "none", "--final_report", "false"]


def start_training(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=out, stderr=out)


def until(condition, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    """Wait for `condition` while `process` runs (it must not end first)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"train.py ended (exit {process.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"still waiting after {seconds} s:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_on_the_folder_ends_at_once_and_writes_nothing(run_args, tmp_path, capsys, snapshot):
    out = tmp_path / "model"
    first = start_training([*run_args, "--output_dir", str(out)], tmp_path / "first.log")
    try:
        until(lambda: is_complete_checkpoint(out / "checkpoint-2"), first, tmp_path / "first.log")
        first.send_signal(signal.SIGSTOP)  # the folder holds still while the second run tries it
        before = snapshot(out)
        started = time.monotonic()
        # --overwrite: a run that did not wait for the lock would delete the first run's checkpoints.
        with pytest.raises(SystemExit) as exit_info:
            train.main([*run_args, "--output_dir", str(out), "--overwrite"])
        seconds = time.monotonic() - started
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(
            f"error: {out} is in use by another run of train.py: PID {first.pid} on this machine, started "
        )
        assert error.rstrip().endswith("; wait for it to end or stop it, or choose another --output_dir.")
        assert snapshot(out) == before
        assert seconds < 10, f"refused after {seconds:.1f} s"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    for name in ("adapter_model.safetensors", "adapter_config.json", "run_config.yaml"):
        assert (out / name).is_file(), name
    assert is_complete_checkpoint(out / f"checkpoint-{STEPS}")
    assert not (out / LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_resume_after_kill_9_takes_over_the_lock_the_killed_run_left(run_args, tmp_path, caplog):
    out = tmp_path / "model"
    first = start_training([*run_args, "--output_dir", str(out)], tmp_path / "first.log")
    until(lambda: is_complete_checkpoint(out / "checkpoint-2"), first, tmp_path / "first.log")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid  # left behind, no longer locked
    with caplog.at_level("INFO"):
        trainer, _ = train.main([*run_args, "--output_dir", str(out), "--resume"])
    assert trainer.state.global_step == STEPS
    assert any(f"the run of PID {first.pid} (started " in message for message in caplog.messages)
    assert (out / "adapter_model.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_a_run_that_ends_before_writing_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "model"
    with pytest.raises(RuntimeError), output_dir_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        raise RuntimeError("a mistake found after the lock was taken")
    assert not (tmp_path / "new").exists()
    with output_dir_lock(out):  # one that wrote something keeps it, without the lock
        (out / "notes.txt").write_text("kept")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

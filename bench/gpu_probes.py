"""The GPU check's probe step: in seconds, the CUDA-only library code that its training steps would meet first.

    python bench/gpu_probes.py --json probes.json          # every probe at Phi-2's sizes (on CPU: what can run there)
    python bench/gpu_probes.py --tiny --json probes.json   # the same at tiny sizes (the rehearsal)

Three pieces of library code run on a GPU only and no CPU test reaches them: bitsandbytes' paged AdamW (its states
in CUDA managed memory; bitsandbytes ends the process when that allocation fails), TRL's chunked log-prob kernel
(Triton kernels, and `torch.addmm(..., out_dtype=float32)` in its backward pass) and the backward pass of a 4-bit
Linear4bit layer under a LoRA adapter (peft's bitsandbytes layer). If one fails in the training steps, every later
step fails the same way; here each probe runs in a process of its own, fails alone and says how. Each result is
compared with plain torch in float32, not only run:

- paged_adamw: three PagedAdamW32bit steps on a CUDA parameter of 131,072 elements (paged from 100,000), against
  torch's AdamW; its states must be paged (managed memory);
- chunked_logprob_DTYPE: TRL's ChunkedLogProbFunction forward and backward at Phi-2's LM head (hidden 2560,
  vocabulary 51,200, with bias) over 5,000 tokens (two of its 4,096-token tiles), under autocast, against
  log_softmax of the full logits;
- linear4bit_lora_DTYPE: Phi-2's fc1 (2560 -> 10240) in 4-bit nf4 with double quantization and a rank-16 LoRA,
  forward and backward under autocast, against the dequantized weight in float32.

DTYPE: bfloat16 and float16 on a GPU (train's and train_fp16's; float16 alone below compute capability 8.0, where
bf16 is emulated); float32 and bfloat16 on CPU (train.py's CPU run and a bf16 CPU's), where the log-prob kernel runs
its torch fallback. What cannot run is reported as skipped, with why.
The JSON says per probe: status, seconds, figures and error; and `optim`, the optimizer the later steps train with:
paged_adamw_32bit, unless paged AdamW failed here (then adamw_torch, and `optim_reason` says why).
Each probe imports the libraries it tests inside its function, which runs in a process of its own (`--one`): a library
that fails to import, or ends the process, fails that probe alone.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from quantization_utils import NATIVE_BF16_CAPABILITY  # noqa: E402

PAGED_ELEMENTS = 2**17  # bitsandbytes pages an optimizer state from 100,000 elements (get_state_buffer)
# (hidden, vocabulary, tokens) of the LM head and (in, out, tokens) of the 4-bit layer, at Phi-2's size and tiny.
SIZES = {
    "phi2": {"head": (2560, 51200, 5000), "layer": (2560, 10240, 2048), "chunk": 32768},
    "tiny": {"head": (160, 2048, 300), "layer": (160, 640, 64), "chunk": 1024},
}
# Largest error allowed against float32. 16-bit logits and products round at about 4e-3 of their size (measured at
# tiny size on CPU: 1e-2 on a log-probability, 3e-3 on a gradient); a broken kernel is off by the size itself.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}
PROBE_TIMEOUT_S = 120


class ProbeFailed(Exception):
    """A probe ran, and its result is wrong: the message says how."""


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def paged_adamw(device, size: dict, dtype_name: str) -> dict:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    start = torch.randn(PAGED_ELEMENTS, device=device)
    paged, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimizers = bnb.optim.PagedAdamW32bit([paged], **settings), torch.optim.AdamW([plain], **settings)
    for _ in range(3):
        gradient = torch.randn_like(start)
        for parameter, optimizer in zip((paged, plain), optimizers, strict=True):
            parameter.grad = gradient.clone()
            optimizer.step()
    torch.cuda.synchronize()
    state = optimizers[0].state[paged]["state1"]
    figures = {
        "elements": PAGED_ELEMENTS,
        "state_paged": bool(getattr(state, "is_paged", False)),
        "max_abs_diff_vs_torch_adamw": (paged - plain).abs().max().item(),
        "max_abs_update": (plain - start).abs().max().item(),  # 3 steps of about lr each
    }
    if not figures["state_paged"]:
        raise ProbeFailed(f"the optimizer state is not in managed memory: {figures}")
    if not figures["max_abs_diff_vs_torch_adamw"] < 1e-4 < figures["max_abs_update"]:
        raise ProbeFailed(f"PagedAdamW32bit's steps differ from torch's AdamW: {figures}")
    return figures


def chunked_logprob(device, size: dict, dtype_name: str) -> dict:
    from transformers.utils import is_triton_available
    from trl.kernels import ChunkedLogProbFunction

    dtype = getattr(torch, dtype_name)
    hidden_size, vocabulary, tokens = size["head"]
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device)
    weight = torch.randn(vocabulary, hidden_size, device=device) * hidden_size**-0.5
    bias = torch.randn(vocabulary, device=device) * 0.1
    targets = torch.randint(vocabulary, (tokens,), device=device)
    inputs = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            *inputs,
            targets,
            1.0,
            size["chunk"],
            None,
            1.0,
            ("entropy", "is_top1"),  # the outputs SFTTrainer asks for
        )
    log_probs.sum().backward()
    exact = [t.to(dtype).float().requires_grad_() for t in (hidden, weight, bias)]  # the same rounded inputs
    reference = torch.log_softmax(exact[0] @ exact[1].T + exact[2], dim=-1)
    reference.gather(1, targets[:, None]).sum().backward()
    figures = {
        "tokens": tokens,
        "vocabulary": vocabulary,
        "kernels": "triton" if is_triton_available() and device.type == "cuda" else "torch (no Triton on this device)",
        "log_prob_max_abs_error": (log_probs.float() - reference.gather(1, targets[:, None])[:, 0]).abs().max().item(),
        "entropy_finite": bool(torch.isfinite(entropy).all()),
    }
    for name, got, want in zip(("hidden", "weight", "bias"), inputs, exact, strict=True):
        figures[f"grad_{name}_relative_error"] = relative_error(got.grad, want.grad)
    check(figures, dtype_name)
    return figures


def linear4bit_lora(device, size: dict, dtype_name: str) -> dict:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig
    from peft.tuners.lora import Linear4bit as LoraLinear4bit

    dtype = getattr(torch, dtype_name)
    fan_in, fan_out, tokens = size["layer"]
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(fan_in, fan_out, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(fan_out, fan_in) * fan_in**-0.5, requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    layer.bias = torch.nn.Parameter(torch.randn(fan_out) * 0.1, requires_grad=False)
    layer = layer.to(device)  # quantizes the weight on the device
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["fc1"])
    lora = LoraLinear4bit(layer, "default", config=config, r=16, lora_alpha=32).to(device)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(std=0.02)  # peft starts B at zero, which would leave A without a gradient
    x = torch.randn(tokens, fan_in, device=device).to(dtype).requires_grad_()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = lora(x)
    (out.float() ** 2).mean().backward()
    dense = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x_exact, a_exact, b_exact = (t.detach().float().requires_grad_() for t in (x, a, b))
    reference = x_exact @ dense.T + layer.bias.float() + (x_exact @ a_exact.T @ b_exact.T) * lora.scaling["default"]
    (reference**2).mean().backward()
    figures = {
        "shape": [tokens, fan_in, fan_out],
        "output_relative_error": relative_error(out, reference),
        "grad_input_relative_error": relative_error(x.grad, x_exact.grad),
        "grad_lora_A_relative_error": relative_error(a.grad, a_exact.grad),
        "grad_lora_B_relative_error": relative_error(b.grad, b_exact.grad),
    }
    check(figures, dtype_name)
    return figures


def check(figures: dict, dtype_name: str) -> None:
    """Every error figure finite and within the dtype's tolerance."""
    errors = {k: v for k, v in figures.items() if k.endswith("_error")}
    bad = {k: v for k, v in errors.items() if not (math.isfinite(v) and v <= TOLERANCE[dtype_name])}
    if bad or figures.get("entropy_finite") is False:
        raise ProbeFailed(f"off from float32 beyond {TOLERANCE[dtype_name]}: {bad or figures}")


PROBES = {"paged_adamw": paged_adamw, "chunked_logprob": chunked_logprob, "linear4bit_lora": linear4bit_lora}


def planned(kind: str, capability: tuple[int, int] | None = None) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(probe name, function, dtype) to run on a device of this kind and compute capability, and the probes skipped
    there with why: the dtypes that device trains in."""
    skipped = {}
    if kind == "cuda" and tuple(capability) < NATIVE_BF16_CAPABILITY:
        dtypes = ("float16",)
        for probe in ("chunked_logprob_bfloat16", "linear4bit_lora_bfloat16"):
            skipped[probe] = "no native bf16 on this GPU: it trains in float16"
    else:
        dtypes = ("bfloat16", "float16") if kind == "cuda" else ("float32", "bfloat16")
    runs = [(f"{probe}_{dtype}", probe, dtype) for probe in ("chunked_logprob", "linear4bit_lora") for dtype in dtypes]
    if kind == "cuda":
        runs.insert(0, ("paged_adamw", "paged_adamw", "float32"))
    else:
        skipped["paged_adamw"] = "paged AdamW needs CUDA (its states live in CUDA managed memory)"
        skipped["chunked_logprob_float16"] = "no float16 training on CPU"
        skipped["linear4bit_lora_float16"] = "no float16 training on CPU"
        skipped["triton_and_addmm_out_dtype"] = (
            "CUDA only: the log-prob kernel ran its torch fallback (addmm in float32) instead"
        )
    return runs, skipped


def run_one(name: str, kind: str, dtype: str, tiny: bool) -> dict:
    """One probe in a process of its own (a probe that ends its process, or breaks CUDA, takes no other with it)."""
    command = [sys.executable, __file__, "--one", kind, "--dtype", dtype, *(["--tiny"] if tiny else [])]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "seconds": PROBE_TIMEOUT_S, "error": f"timed out after {PROBE_TIMEOUT_S} s"}
    record = {"seconds": round(time.monotonic() - start, 1)}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {**record, **json.loads(lines[-1])}
    tail = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()][-3:]
    return {**record, "status": "failed", "error": f"exit {done.returncode}: " + " | ".join(tail)[:600]}


def run_probes(tiny: bool) -> dict:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    runs, skipped = planned(device_type, torch.cuda.get_device_capability() if device_type == "cuda" else None)
    with ThreadPoolExecutor(len(runs)) as pool:
        records = list(pool.map(lambda run: run_one(*run, tiny), runs))
    result = {
        "device": torch.cuda.get_device_name() if device_type == "cuda" else "CPU",
        "size": "tiny" if tiny else "phi2",
        "probes": {name: record for (name, _, _), record in zip(runs, records, strict=True)},
        "skipped": skipped,
    }
    result["optim"], reason = optimizer_after(result["probes"])
    if reason:
        result["optim_reason"] = reason
    return result


def optimizer_after(probes: dict) -> tuple[str, str | None]:
    """The optimizer the later steps train with, and why when it is not the recipe's: adamw_torch when paged AdamW
    failed here (it would fail in every training step), else paged_adamw_32bit (on CPU train.py swaps it itself)."""
    paged = probes.get("paged_adamw")
    if paged is not None and paged["status"] != "passed":
        return "adamw_torch", f"paged AdamW failed here ({paged['error']}): the later steps train with adamw_torch"
    return "paged_adamw_32bit", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes (the rehearsal on CPU).")
    parser.add_argument("--json", help="Write the results here.")
    parser.add_argument("--one", choices=sorted(PROBES), help=argparse.SUPPRESS)  # a probe's own process
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        size = SIZES["tiny" if args.tiny else "phi2"]
        try:
            figures = PROBES[args.one](device, size, args.dtype)
        except ProbeFailed as e:
            print(json.dumps({"status": "failed", "error": str(e)}))
            return 0
        print(json.dumps({"status": "passed", "figures": figures}))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_probes(args.tiny)
    for name, record in result["probes"].items():
        print(f"{name}: {record['status']} ({record['seconds']} s) {record.get('error') or record.get('figures')}")
    for name, why in result["skipped"].items():
        print(f"{name}: skipped: {why}")
    print(f"optimizer for the later steps: {result['optim']}", result.get("optim_reason", ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["status"] == "passed" for r in result["probes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

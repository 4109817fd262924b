"""Phi-2 QLoRA steps at 512 tokens, micro-batch 4: the original recipe's batching against this repo's default.

    python bench/gpu_phi2.py                  # on a CUDA GPU: Phi-2's exact size, random weights (untested)
    python bench/gpu_phi2.py --tiny           # the same code at a tiny size on CPU (a smoke test, ~1 minute)
    python bench/gpu_phi2.py --steps 30 --attn_implementation flash_attention_2
    python bench/gpu_phi2.py --keep_model /tmp/phi2 --build_only            # only write the random Phi-2
    python bench/gpu_phi2.py --model /tmp/phi2 --variants ours --micro_batch 8 --activation_checkpointing false

The model is a PhiForCausalLM with Phi-2's exact configuration (microsoft/phi-2's config.json: hidden 2560,
32 layers, 32 heads of 80, MLP 10240, vocabulary 51,200, partial rotary factor 0.4, gelu_new, layer-norm eps 1e-5,
untied output head, resid_pdrop 0.1) and random weights, so nothing is downloaded. It is saved once in bf16 and
loaded through the repo's `model_utils.load_model` (4-bit nf4, double quantization, bf16 compute), as `train.py`
loads microsoft/phi-2. Both variants train the repo's default LoRA (r 64, alpha 16, dropout 0.1 on q/k/v/dense/fc1/
fc2) with gradient checkpointing and paged AdamW 32-bit, micro-batch 4, one micro-batch per optimizer step, on the
bundled oasst1 conversations (tokenized with SmolLM2's tokenizer from cache/ when present, as a stand-in for Phi-2's
byte-level BPE; else with tiny_model.py's BPE; --tokenizer chooses):

- original: each batch of 4 conversations padded to its longest, cut at 512 tokens, no packing;
- ours: the repo's default: 4 rows of up to 512 tokens packed best-fit-decreasing, run padding-free.

Reported per variant (each in its own process, so the CUDA peak is its own): real tokens per second over the timed
steps (after --warmup steps), model FLOPs utilization, and peak CUDA memory (max allocated, and reserved).

MFU = real tokens/s x 4 x N / peak FLOPs. N: the parameters that take part in a matmul per token (every linear layer
of the base model, the output head included; the input embedding is a lookup), 2.65e9 for Phi-2. 4N: a forward pass
is 2N FLOPs a token, and the backward pass of a frozen base is 2N more (gradients for the activations, none for the
frozen weights; the LoRA weights add under 2%). Not counted, as is usual for "model" FLOPs: attention scores, the
recomputation of gradient checkpointing, 4-bit dequantization. Peak dense bf16 tensor FLOPs (vendor data sheets):
"""

import argparse
import tempfile
import time
from pathlib import Path

import bench_utils as bench  # first of the repository's modules: it puts the repository root on sys.path
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM, TrainerCallback

from adapter_utils import build_lora_config
from config import LoraArguments, ModelArguments, QuantizationArguments
from model_utils import load_model, load_tokenizer
from tiny_model import build_tokenizer
from train_settings import TrainingConfig
from trainer_setup import build_trainer

# Dense bf16 tensor-core peak, TFLOPS (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,  # the SXM part's device name
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": None,  # no published dense bf16 figure for this AWS part: pass --peak_tflops
    "A10": 125.0,
}
__doc__ += (
    "".join(f"{name} {tflops:g}; " for name, tflops in PEAK_BF16_TFLOPS.items() if tflops) + "else --peak_tflops.\n"
)

PHI2 = dict(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="gelu_new",
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    partial_rotary_factor=0.4,
    rope_theta=10000.0,
    qk_layernorm=False,
    resid_pdrop=0.1,
    embd_pdrop=0.0,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    bos_token_id=50256,
    eos_token_id=50256,
)
# --tiny: the same architecture, small enough for a CPU (head_dim 40, of which 0.4 = 16 rotary dims, as Phi-2's 32/80).
TINY = dict(hidden_size=160, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def matmul_params(config) -> int:
    """Parameters used in a matmul for every token: all linear layers, output head included, embedding excluded."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * (h * h + h) + 2 * h * i + i + h  # q, k, v, dense; fc1, fc2 (with biases)
    return layers * per_layer + v * h + v


def build_model(out: Path, tiny: bool, tokenizer_from: str = "auto", vocabulary_of_tokenizer: bool = False) -> Path:
    """Phi-2's configuration with random weights, saved in bf16 with a tokenizer, loadable like microsoft/phi-2.

    tokenizer_from: a tokenizer folder, "tiny" (tiny_model.py's byte-level BPE) or "auto" (SmolLM2's from cache/ when
    present, else tiny). vocabulary_of_tokenizer: size the embedding and output head to the tokenizer instead of
    Phi-2's 51,200 (a much smaller tiny model with the tiny BPE). Also used by bench/gpu_check.py, whose training
    steps run on this model."""
    if tokenizer_from == "auto":
        tokenizer_from = str(bench.SMOLLM2) if bench.SMOLLM2.is_dir() else "tiny"
    tokenizer = build_tokenizer() if tokenizer_from == "tiny" else AutoTokenizer.from_pretrained(tokenizer_from)
    vocabulary = {}
    if vocabulary_of_tokenizer:
        vocabulary = dict(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
    config = PhiConfig(**{**PHI2, **(TINY if tiny else {}), **vocabulary})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the variants run in their own processes and need the GPU to themselves
    assert len(tokenizer) <= config.vocab_size
    tokenizer.save_pretrained(out)
    return out


def run_variant(args) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(args.model)
    model = load_model(
        ModelArguments(model_name_or_path=args.model, attn_implementation=args.attn_implementation),
        QuantizationArguments(),  # 4-bit nf4, double quantization, bf16 compute where the GPU has it
    )
    # The Trainer goes round the records again if it needs more.
    records = bench.training_records(bench.SAMPLE, "best", tokenizer=tokenizer, max_length=args.max_length)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        max_steps=args.warmup + args.steps,
        save_strategy="no",
        logging_steps=10**6,
        max_length=args.max_length,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,  # one micro-batch per step: each step's time is one micro-batch's
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    packing = args.variant == "ours"
    training_args = TrainingConfig(
        **common, packing=packing, activation_checkpointing=args.activation_checkpointing, optim=args.optim
    )
    lora = build_lora_config(LoraArguments(), "phi")
    trainer = build_trainer(model, tokenizer, training_args, Dataset.from_list(records), peft_config=lora)
    counter = bench.TokenCounter(trainer)
    marks = []  # (time, real tokens trained so far) at the end of every step

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            # SFTTrainer counts each micro-batch's real tokens as it computes its loss (the collator runs a batch
            # ahead of training, so its count would be off by one batch).
            marks.append((time.perf_counter(), trainer._total_train_tokens))

    trainer.add_callback(Clock())
    trainer.train()
    (t0, real0), (t1, real1) = marks[args.warmup - 1], marks[-1]
    tokens_per_second = (real1 - real0) / (t1 - t0)
    n = matmul_params(model.config)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    peak, peak_kind = bench.peak_memory_mib()
    return {
        "variant": args.variant,
        "device": device,
        "timed_steps": len(marks) - args.warmup,
        "real_tokens_timed": real1 - real0,
        "useful_token_share": round(counter.real / counter.processed, 4),
        "seconds_timed": round(t1 - t0, 2),
        "real_tokens_per_second": round(tokens_per_second, 1),
        "matmul_params": n,
        "peak_tflops": peak_tflops,
        "mfu": round(tokens_per_second * 4 * n / (peak_tflops * 1e12), 4) if peak_tflops else None,
        "peak_memory_gib": round(peak / 1024, 2),
        "peak_memory_kind": peak_kind,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        "packing": bool(trainer.args.packing),
        "micro_batch": args.micro_batch,
        "max_length": args.max_length,
        "activation_checkpointing": bool(trainer.args.activation_checkpointing),
    }


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Phi-2's architecture at a tiny size (CPU smoke test).")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps (one micro-batch each).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (kernel selection, allocator).")
    parser.add_argument("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2.")
    parser.add_argument("--peak_tflops", type=float, help="The GPU's dense bf16 peak, if not in the table.")
    parser.add_argument("--micro_batch", type=int, default=4, help="Rows per micro-batch (one per optimizer step).")
    parser.add_argument("--max_length", type=int, default=512, help="Tokens per row.")
    parser.add_argument(
        "--activation_checkpointing",
        type=lambda v: v.lower() in ("true", "1", "yes"),
        default=True,
        help="true or false: recompute activations in the backward pass (the repo's default).",
    )
    parser.add_argument(
        "--optim", default="paged_adamw_32bit", help="The optimizer (the recipe's paged AdamW; adamw_torch on CPU)."
    )
    parser.add_argument("--variants", default="original,ours", help="Which variants to run, comma-separated.")
    parser.add_argument("--model", help="Reuse a model folder written by an earlier run (--keep_model).")
    parser.add_argument("--keep_model", help="Write the random Phi-2 here (5.6 GB) and keep it for later runs.")
    parser.add_argument("--build_only", action="store_true", help="Only write the model to --keep_model.")
    parser.add_argument(
        "--vocabulary_of_tokenizer",
        action="store_true",
        help="Size the embedding and output head to the tokenizer, not to Phi-2's 51,200 tokens (a faster --tiny).",
    )
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="Tokenizer saved with the model: a folder, 'tiny' (tiny_model.py's BPE), or auto (SmolLM2's from "
        "cache/ when present, else tiny).",
    )
    parser.add_argument("--json", default="bench/results/gpu_phi2.json", help="Where to write the figures.")
    bench.add_variant_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of a step)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"original", "ours"}:
        parser.error("--variants takes original, ours or both (comma-separated)")
    if args.build_only and not args.keep_model:
        parser.error("--build_only needs --keep_model DIR (where to write the model)")
    if args.build_only:
        print(build_model(Path(args.keep_model), args.tiny, args.tokenizer, args.vocabulary_of_tokenizer))
        return {}

    if bench.run_child_variant(args, run_variant):
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            folder = Path(args.keep_model or Path(tmp) / "phi2-random")
            model_dir = str(build_model(folder, args.tiny, args.tokenizer, args.vocabulary_of_tokenizer))
        results = {variant: bench.run_variant_process(__file__, argv, model_dir, variant, tmp) for variant in variants}

    original, ours = results.get("original", {}), results.get("ours", {})
    summary = {
        "model": "Phi-2 architecture, random weights" + (" (tiny size)" if args.tiny else " (full size)"),
        "attn_implementation": args.attn_implementation,
        **results,
    }
    if original and ours:
        summary["tokens_per_second_ratio"] = round(
            ours["real_tokens_per_second"] / original["real_tokens_per_second"], 2
        )
    some = ours or original
    print(
        f"\n{summary['model']}, 4-bit nf4 QLoRA, micro-batch {args.micro_batch} x {args.max_length}, gradient "
        f"checkpointing {'on' if args.activation_checkpointing else 'off'}, on {some['device']}"
    )
    bench.print_table(
        original,
        ours,
        [
            *bench.SPEED_ROWS,
            ("timed steps", "timed_steps", "{:d}"),
            ("MFU (4N FLOPs per token)", "mfu", "{:.3f}"),
            (f"peak memory GiB ({some['peak_memory_kind']})", "peak_memory_gib", "{:.2f}"),
            ("peak CUDA memory reserved GiB", "peak_reserved_gib", "{:.2f}"),
        ],
    )
    if "tokens_per_second_ratio" in summary:
        print(f"real tokens/s ratio (ours / original): {summary['tokens_per_second_ratio']}x")
    bench.write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()

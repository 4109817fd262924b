"""Training throughput: the original recipe's batching against this repo's default, in one run.

    python bench/train_throughput.py                                       # tiny Phi-architecture model, CPU
    python bench/train_throughput.py --model cache/smollm2/SmolLM2-135M-Instruct --examples 64
    python bench/train_throughput.py --data_policy pairs                   # the original's single-turn pairs

Both variants train the same model (4-bit nf4 QLoRA, LoRA r 16, gradient checkpointing, float32 on CPU / bf16 on
GPUs that have it, the repo's other defaults) for one pass over the same real conversations, so they see the same real
tokens. Only the batching differs:

- original: micro-batch 4, each batch padded to its longest example, cut at --max_length 512, no packing;
- ours: this repo's default (`TrainingConfig()`): TRL's best-fit-decreasing packing into rows of 512 tokens,
  micro-batch 4 rows run padding-free, examples kept apart by position ids.

Reported for each: the useful-token share (real tokens / tokens the model processed), real tokens per second of
training (wall time of trainer.train()), the ratio, and peak memory (peak RSS of the process on CPU, CUDA peak
allocated on a GPU). Each variant runs in its own process so that its peak memory is its own, --repeats times,
taking turns with the other; the table shows each variant's fastest run (every run time is printed and saved). The
default tiny model is a PhiForCausalLM with random weights built on the fly (--hidden_size, --layers); with SmolLM2's
tokenizer in cache/ (fetched by `make demo`) it uses that vocabulary (Phi-2's tokenizer stand-in), else the tiny
byte-level BPE.
"""

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import bench_utils as bench  # first of the repository's modules: it puts the repository root on sys.path
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

from adapter_utils import build_lora_config
from config import LoraArguments, ModelArguments, QuantizationArguments
from model_utils import load_model, load_tokenizer
from tiny_model import build_tiny_phi
from train_settings import TrainingConfig
from trainer_setup import build_trainer


def build_default_model(out: Path, hidden_size: int, layers: int, tokenizer_from: str | None) -> Path:
    """A random PhiForCausalLM; with a stand-in tokenizer, sized to its vocabulary."""
    if tokenizer_from is None:
        return build_tiny_phi(out, hidden_size=hidden_size, layers=layers)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64),
        max_position_embeddings=2048,
        partial_rotary_factor=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    PhiForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_variant(args) -> dict:
    """One variant, in this process: train one pass, return its figures."""
    tokenizer = load_tokenizer(args.model)
    records = bench.training_records(args.data, args.data_policy, args.examples, tokenizer, args.max_length)
    model = load_model(
        ModelArguments(model_name_or_path=args.model, attn_implementation=args.attn_implementation),
        QuantizationArguments(load_in_4bit=args.load_in_4bit),
    )
    common = dict(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        max_steps=-1,
        num_train_epochs=1,
        save_strategy="no",
        logging_steps=10**6,
        max_length=args.max_length,
        seed=0,
        bf16=args.bf16,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if args.variant == "original":
        training_args = TrainingConfig(
            **common, packing=False, per_device_train_batch_size=4, gradient_accumulation_steps=4
        )
    else:
        training_args = TrainingConfig(**common)  # the repo's defaults: packed, micro-batch 4, accumulation 2
    lora = build_lora_config(LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.05), model.config.model_type)
    trainer = build_trainer(model, tokenizer, training_args, Dataset.from_list(records), peft_config=lora)

    counter = bench.TokenCounter(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    peak, peak_kind = bench.peak_memory_mib()
    return {
        "variant": args.variant,
        "examples": len(records),
        "trained_examples": bench.trained_examples(trainer.train_dataset),
        "micro_batches": counter.micro_batches,
        "optimizer_steps": result.global_step,
        "real_tokens": counter.real,
        "processed_tokens": counter.processed,
        "useful_token_share": round(counter.real / counter.processed, 4),
        "train_seconds": round(seconds, 2),
        "real_tokens_per_second": round(counter.real / seconds, 1),
        "train_loss": round(result.training_loss, 4),
        "peak_memory_mib": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "rss_before_training_mib": round(rss_before, 1),
        "packing": bool(trainer.args.packing),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: a tiny random Phi built on the fly).")
    parser.add_argument("--hidden_size", type=int, default=128, help="Width of the default tiny model.")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the default tiny model.")
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="Tokenizer for the default tiny model: a folder, 'tiny' (the byte-level BPE of tiny_model.py), or auto "
        "(SmolLM2's from cache/ when present, else tiny).",
    )
    parser.add_argument("--data", default=str(bench.SAMPLE), help="oasst1 data (any --dataset format of train.py).")
    parser.add_argument(
        "--data_policy",
        choices=["best", "replies", "pairs"],
        default="best",
        help="best / replies: the repo's conversations; pairs: the original recipe's prompt + reply pairs.",
    )
    parser.add_argument(
        "--examples", type=int, default=32, help="Use the first N examples (0: all; the sample has 100 trees)."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Runs of each variant, taking turns; each keeps its fastest run."
    )
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--load_in_4bit", type=lambda s: s.lower() == "true", default=True)
    parser.add_argument("--bf16", type=lambda s: s.lower() == "true", default=None, help="Default: as train.py.")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--json", default="bench/results/train_throughput.json", help="Where to write the figures.")
    bench.add_variant_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    if bench.run_child_variant(args, run_variant):
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            tokenizer_from = {"auto": str(bench.SMOLLM2) if bench.SMOLLM2.is_dir() else None, "tiny": None}.get(
                args.tokenizer, args.tokenizer
            )
            args.model = str(build_default_model(Path(tmp) / "model", args.hidden_size, args.layers, tokenizer_from))
            model_name = f"tiny random Phi (hidden {args.hidden_size}, {args.layers} layers, tokenizer "
            model_name += f"{Path(tokenizer_from).name if tokenizer_from else 'tiny BPE'})"
        else:
            model_name = args.model
        # The variants take turns (original, ours, original, ours, ...) so that a slow spell of a shared machine
        # hits both alike; each keeps its fastest run, the usual estimate of what the code itself costs.
        runs = {"original": [], "ours": []}
        for _ in range(args.repeats):
            for variant in runs:
                runs[variant].append(bench.run_variant_process(__file__, argv, args.model, variant, tmp))
        results = {}
        for variant, variant_runs in runs.items():
            results[variant] = min(variant_runs, key=lambda r: r["train_seconds"])
            results[variant]["train_seconds_every_run"] = [r["train_seconds"] for r in variant_runs]

    original, ours = results["original"], results["ours"]
    summary = {
        "model": model_name,
        "data": f"{Path(args.data).name}, {args.data_policy}, {original['examples']} examples",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "machine": platform.platform(),
        "original": original,
        "ours": ours,
        "tokens_per_second_ratio": round(ours["real_tokens_per_second"] / original["real_tokens_per_second"], 2),
    }
    print_summary(summary, results)
    bench.write_json(args.json, summary)
    return summary


def print_summary(summary: dict, results: dict) -> None:
    """The two variants side by side, with every run's time and the ratio of their speeds."""
    original, ours = results["original"], results["ours"]
    rows = [
        *bench.SPEED_ROWS,
        ("examples trained", "trained_examples", "{:d}"),
        ("real tokens", "real_tokens", "{:d}"),
        ("tokens processed", "processed_tokens", "{:d}"),
        ("micro-batches", "micro_batches", "{:d}"),
        ("train seconds", "train_seconds", "{:.1f}"),
        (f"peak memory MiB ({original['peak_memory_kind']})", "peak_memory_mib", "{:.0f}"),
        ("train loss", "train_loss", "{:.4f}"),
    ]
    print(f"\n{summary['model']} on {summary['device']}; data: {summary['data']}")
    bench.print_table(original, ours, rows)
    for variant in ("original", "ours"):
        print(f"train seconds, every run of {variant}: {results[variant]['train_seconds_every_run']}")
    print(f"real tokens/s ratio (ours / original), fastest runs: {summary['tokens_per_second_ratio']}x")
    if not ours["packing"]:
        print("note: packing fell back to length grouping for this model (see the warning above)")


if __name__ == "__main__":
    main()

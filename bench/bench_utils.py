"""What the benchmark scripts share: the training data, a token-counting collator, peak memory, the result table."""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_utils import (  # noqa: E402  (the repo's modules, through the path above)
    SAMPLE,  # noqa: F401  (the scripts' data)
    Conversations,
    load_conversations,
)
from training_examples import drop_untrainable_examples, to_training_records  # noqa: E402

SMOLLM2 = ROOT / "cache" / "smollm2" / "SmolLM2-135M-Instruct"  # fetched by `make demo`


def training_records(path: str | Path, policy: str, limit: int = 0, tokenizer=None, max_length: int = 512) -> list:
    """SFTTrainer rows: the repo's conversations (best / replies), or the original recipe's single-turn pairs (the
    best-ranked reply and the prompt right above it). With a tokenizer, as train.py: without the examples that
    truncation to max_length would leave with nothing to train (so both variants train the same examples)."""
    if policy == "pairs":
        replies = load_conversations(str(path), policy="replies")
        conversations = Conversations([{"messages": e["messages"][-2:]} for e in replies.examples], "all")
    else:
        conversations = load_conversations(str(path), policy=policy)
    if limit:
        conversations.examples = conversations.examples[:limit]
    if tokenizer is not None:
        conversations = drop_untrainable_examples(conversations, tokenizer, max_length)
    return to_training_records(conversations)


def add_variant_arguments(parser) -> None:
    """The hidden flags by which a benchmark script runs one variant in a child process (run_variant_process)."""
    parser.add_argument("--variant", choices=["original", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def run_child_variant(args, run_variant) -> bool:
    """In a child process started by run_variant_process: run the one variant and write its figures; else False."""
    if not args.variant:
        return False
    Path(args.result).write_text(json.dumps(run_variant(args)))
    return True


def run_variant_process(script: str, argv: list[str] | None, model: str, variant: str, tmp: str | Path) -> dict:
    """Run one variant of a benchmark script in a process of its own (so its peak memory is its own); its figures."""
    out = Path(tmp) / f"{variant}.json"
    child = [sys.executable, script, *(argv if argv is not None else sys.argv[1:])]
    child += ["--model", model, "--variant", variant, "--result", str(out)]
    subprocess.run(child, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


class TokenCounter:
    """Wraps a trainer's collator: counts the real tokens and the tokens the model processes (real + padding)."""

    def __init__(self, trainer):
        self.collate = trainer.data_collator
        self.real = self.processed = self.micro_batches = 0
        trainer.data_collator = self

    def __call__(self, rows):
        batch = self.collate(rows)
        self.micro_batches += 1
        self.processed += batch["input_ids"].numel()
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        else:  # padding-free: one row, padded at most to pad_to_multiple_of (off by default)
            self.real += sum(len(r["input_ids"]) for r in rows)
        return batch


def trained_examples(dataset) -> int:
    """Examples in a prepared training set (a packed row holds several)."""
    return sum(map(len, dataset["seq_lengths"])) if "seq_lengths" in dataset.column_names else len(dataset)


def peak_memory_mib() -> tuple[float, str]:
    import torch  # here: the GPU check's runner imports this module for its paths, and must start without torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


# The rows both comparisons print first: (label, key in the figures, format).
SPEED_ROWS = [
    ("useful-token share", "useful_token_share", "{:.3f}"),
    ("real tokens / s", "real_tokens_per_second", "{:.1f}"),
]


def print_table(original: dict, ours: dict, rows: list[tuple[str, str, str]]) -> None:
    print(f"{'':<44}{'original':>12}{'ours':>12}")
    for label, key, fmt in rows:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in (original, ours)]
        print(f"{label:<44}{cells[0]:>12}{cells[1]:>12}")


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")

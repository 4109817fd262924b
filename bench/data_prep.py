"""Time the oasst1 conversion at full scale: this repo's multi-turn conversations against the original recipe's
single-turn pairs.

    python bench/data_prep.py                       # 84,437 rows (the size of oasst1's train split), 5 repeats
    python bench/data_prep.py --rows 200000 --repeats 3 --json bench/results/data_prep.json

The rows are the bundled sample (data/oasst1/laion_en_100_tree.jsonl, 100 trees, 1,167 messages) replicated under
fresh message and tree ids until there are --rows of them (the last copy is cut in depth-first order, so every parent
comes before its replies and the links stay consistent). Both preparations start from the same rows in memory (the
columns of the Hub data set), so the figures compare the conversion itself, not file reading:

- this repo: `oasst_trees.filter_messages` + `Tree` + `best_path_conversations` (--policy best: one multi-turn
  conversation per tree along the best-ranked replies), then the training text of each conversation;
- the original recipe, re-implemented: for each assistant message, its parent prompt and the reply, formatted
  "### Human: {prompt} ### Assistant: {reply}" (pandas, as in the original notebook style: a data frame of the rows,
  the parent's text looked up by parent_id).

Prints a table and writes JSON (--json). The best of --repeats runs is reported (the machine may be shared).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chat_template import format_text  # noqa: E402
from data_utils import SAMPLE, read_jsonl  # noqa: E402
from oasst_trees import Tree, best_path_conversations, filter_messages, flatten_trees  # noqa: E402

OASST1_TRAIN_ROWS = 84_437


def replicated_rows(rows: int, sample: Path = SAMPLE) -> list[dict]:
    """`rows` oasst1 rows: copies of the sample's messages under fresh ids (message, parent and tree ids)."""
    base = flatten_trees(read_jsonl(sample))
    out = []
    copy = 0
    while len(out) < rows:
        suffix = f"-copy{copy}"
        for row in base[: rows - len(out)]:
            fresh = dict(row)
            fresh["message_id"] = row["message_id"] + suffix
            fresh["message_tree_id"] = row["message_tree_id"] + suffix
            fresh["parent_id"] = row["parent_id"] + suffix if row.get("parent_id") else None
            out.append(fresh)
        copy += 1
    return out


def repo_multi_turn(rows: list[dict]) -> list[str]:
    """This repo's preparation (--policy best), up to the text each conversation is trained as."""
    kept, _ = filter_messages(rows, [])
    conversations = best_path_conversations(Tree(kept))
    return [format_text(c["messages"]) for c in conversations]


def original_single_turn(rows: list[dict]) -> list[str]:
    """The original recipe's preparation: one "### Human: ... ### Assistant: ..." pair per assistant message."""
    df = pd.DataFrame(rows)
    texts = df.set_index("message_id")["text"]
    pairs = []
    for _, row in df[df["role"] == "assistant"].iterrows():
        prompt = texts.get(row["parent_id"])
        if prompt is not None:
            pairs.append(f"### Human: {prompt} ### Assistant: {row['text']}")
    return pairs


def best_time(function, rows, repeats: int) -> tuple[float, list[str]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = function(rows)
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=OASST1_TRAIN_ROWS, help="Rows to prepare (oasst1 train: 84,437).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs of each; the fastest is reported.")
    parser.add_argument("--json", default="bench/results/data_prep.json", help="Where to write the figures.")
    args = parser.parse_args(argv)

    rows = replicated_rows(args.rows)
    ours_s, conversations = best_time(repo_multi_turn, rows, args.repeats)
    original_s, pairs = best_time(original_single_turn, rows, args.repeats)
    result = {
        "rows": len(rows),
        "repeats": args.repeats,
        "repo_multi_turn": {"seconds": round(ours_s, 3), "examples": len(conversations)},
        "original_single_turn": {"seconds": round(original_s, 3), "examples": len(pairs)},
        "speedup": round(original_s / ours_s, 2),
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }
    print(f"{'preparation':<40}{'rows':>8}{'examples':>10}{'seconds':>10}")
    print(f"{'this repo (multi-turn, --policy best)':<40}{len(rows):>8}{len(conversations):>10}{ours_s:>10.3f}")
    print(f"{'original (single-turn pairs)':<40}{len(rows):>8}{len(pairs):>10}{original_s:>10.3f}")
    print(f"speed-up: {result['speedup']}x (best of {args.repeats})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

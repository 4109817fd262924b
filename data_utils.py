"""A run's data: oasst1 (or your own file) -> multi-turn conversations or preference pairs, and the held-out trees.

Preview or export what training will see:

    python data_utils.py --input data/oasst1/laion_en_100_tree.jsonl --out conversations.jsonl
    python data_utils.py --input data/oasst1/laion_en_100_tree.jsonl --policy replies --out replies.jsonl
    python data_utils.py --input hub --split validation --langs en,de --out validation.jsonl
    python data_utils.py --input data/oasst1/laion_en_100_tree.jsonl --policy best_vs_rest --out pairs.jsonl

Sources: the Hub data set (`hub` or `OpenAssistant/oasst1`), a local file of oasst1 rows (.jsonl or .parquet with the
Hub's columns), an oasst1 trees export (.jsonl, one tree per line, or .jsonl.gz as the Hub serves it), or your own data
in the chat formats of the ecosystem (messages, ShareGPT, Alpaca, prompt-completion, preference pairs, text lines):
data_formats.py reads the files and tells the formats. Which oasst1 messages are kept, and how messy rows end (a loop
of parent links, a duplicate id, a mistyped column: one error naming the row), is oasst_trees.py's concern.

Policies (for oasst1 sources; your own conversations are used whole, with loss on every assistant turn, and
prompt-completion records with loss on the completion):
- best: one conversation per tree, following the best-ranked assistant reply at every assistant step, ending at an
  assistant message; loss on every assistant turn. Prompter messages carry no rank, so where a conversation can go on
  with several human follow-ups we take the one that leads to the most assistant turns (ties: smallest message_id),
  which keeps as much multi-turn data as the tree has. "Best-ranked" is the lowest `rank` among siblings (ranks are not
  always 0..k-1); unranked replies come after ranked ones, and ties go to the smallest message_id.
- replies: one example per best-ranked assistant reply at any depth, with all its ancestors as context; loss on that
  reply only. The original repo trained on the same replies but threw the context away.

Preference policies (for --method dpo/orpo, and the report's preference accuracy; oasst1 sources): pairs of
sibling assistant replies that people ranked, in TRL's conversational preference format `{"prompt": [messages],
"chosen": [assistant message], "rejected": [assistant message]}`, the prompt being the exact ancestor path
(multi-turn).
- best_vs_rest (default): the best-ranked reply against each reply ranked below it.
- all_pairs: every two replies of different rank, the better one chosen.
Unranked replies and replies of equal rank never pair (oasst_trees.preference_pairs). Your own preference pairs are
used as they are; for SFT (and the held-out loss) they are the conversations of each prompt and its chosen reply, with
loss on that reply.
"""

import hashlib
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chat_template import format_text, portable_template
from cli_utils import argument_parser, fail
from config import DataArguments, DataError
from data_formats import LOSS_ON, read_records, record_format, unknown_format_message, user_examples
from oasst_trees import (
    PAIR_POLICIES,
    ROW_COLUMNS,
    Tree,
    best_path_conversations,
    filter_messages,
    preference_pairs,
    reply_examples,
    rows_from_trees,
)

logger = logging.getLogger(__name__)

HUB_DATASET = "OpenAssistant/oasst1"
SAMPLE = Path(__file__).parent / "data" / "oasst1" / "laion_en_100_tree.jsonl"  # 100 real trees, bundled


CONVERSATION_POLICIES = ("best", "replies")


@dataclass
class Conversations:
    """Examples ready for training, and how they were made."""

    # {"messages": [...], "id": last reply's message_id, "tree_id": ...}; preference pairs (loss_on "pairs"):
    # {"prompt": [...], "chosen": [reply], "rejected": [reply], "id": "chosen_id>rejected_id", "tree_id": ...,
    # "context_id": the prompter message both reply to}
    examples: list[dict]
    loss_on: str  # "all": every assistant turn; "last": the final reply only; "pairs": preference pairs
    counts: Counter = field(default_factory=Counter)
    source_format: str = "oasst1"  # your own data: its format (data_formats.FORMATS)

    def summary(self) -> str:
        c = self.counts
        if "records" in c:  # your own data
            made = {"all": "conversations", "last": "examples", "pairs": "preference pairs"}[self.loss_on]
            if self.source_format == "preference pairs" and self.loss_on == "last":
                made = "conversations of a prompt and its chosen reply"
            dropped = f", dropped {c['no_reply']} without an assistant reply" if c["no_reply"] else ""
            return f"{c['records']} records read as {self.source_format}: kept {len(self.examples)} {made}{dropped}"
        if "messages" not in c:
            return f"{len(self.examples)} conversations"
        if self.loss_on == "pairs":
            contexts = len({e["context_id"] for e in self.examples})
            made = f"{len(self.examples)} preference pairs from {contexts} ranked contexts"
        else:
            made = f"{len(self.examples)} examples"
        return (
            f"{c['messages']} messages: removed {c['deleted']} deleted, {c['rejected']} rejected in review, "
            f"{c['other_language']} in other languages, {c['orphaned']} orphaned (parent missing or removed)"
            + (f", {c['out_of_turn']} out of turn (same role as the parent)" if c["out_of_turn"] else "")
            + f"; kept {c['kept']} -> {made}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading sources


def read_jsonl(path: Path) -> list:
    """Every record of a data file (data_formats.read_records), in a list."""
    return [record for _, record in read_records(path)]


def load_hub_rows(split: str) -> list[dict]:
    """oasst1's rows of this split from the Hugging Face Hub."""
    try:
        # Imported for the Hub only: `datasets` takes seconds to import, which local files and --help do without.
        from datasets import load_dataset

        dataset = load_dataset(HUB_DATASET, split=split)
    except Exception as e:  # the Hub raises many kinds (offline, missing split, auth); all mean "can't load it"
        raise DataError(
            f"cannot load {HUB_DATASET} split {split!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Without network, pass a local file with --dataset."
        ) from None
    return dataset.select_columns(list(ROW_COLUMNS)).to_list()


def read_source(source: str, split: str = "train") -> tuple[str, list | Conversations, list[str] | None]:
    """("oasst", rows, where each row came from or None for "row N") or ("user", Conversations, None), for a Hub
    name or a local path; the format of a local file is that of its first record."""
    if source in ("hub", HUB_DATASET):
        return "oasst", load_hub_rows(split), None
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {source} (pass a local file, or 'hub' for {HUB_DATASET}).")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # for .parquet files only, as `datasets` above

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several error types for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({e}).") from None
        return "oasst", table.select([c for c in ROW_COLUMNS if c in table.column_names]).to_pylist(), None
    records = read_records(path)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path} holds no records.")
    fmt = record_format(first[1])
    if fmt is None:
        raise DataError(unknown_format_message(first[1], path, first[0]))
    records = itertools.chain([first], records)
    if fmt == "oasst1 trees":
        trees = [tree for _, tree in records]
        try:
            return "oasst", *rows_from_trees(trees)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    if fmt == "oasst1 rows":
        missing = [c for c in ("message_id", "text", "role") if c not in first[1]]
        if missing:
            raise DataError(f"{path}: rows lack the oasst1 columns {', '.join(missing)}.")
        return "oasst", [row for _, row in records], None
    examples, counts = user_examples(fmt, records, path)
    return "user", Conversations(examples, LOSS_ON.get(fmt, "all"), counts, fmt), None


def load_conversations(
    source: str, split: str = "train", policy: str = "best", langs: list[str] | None = None
) -> Conversations:
    """Read a source and turn it into training examples (or preference pairs); logs what each filter removed."""
    if policy not in CONVERSATION_POLICIES + PAIR_POLICIES:
        raise DataError(f"unknown policy {policy!r}: choose {', '.join(CONVERSATION_POLICIES + PAIR_POLICIES)}.")
    kind, records, places = read_source(source, split)
    if kind == "user":
        return own_data(records, source, policy, langs)
    try:
        kept, counts = filter_messages(records, langs or [], places)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    tree = Tree(kept)
    if policy == "best":
        examples, loss_on = best_path_conversations(tree), "all"
    elif policy == "replies":
        examples, loss_on = reply_examples(tree), "last"
    else:
        examples, loss_on = preference_pairs(tree, policy), "pairs"
    conversations = Conversations(examples, loss_on, counts)
    logger.info("%s (%s): %s", source, policy, conversations.summary())
    if not examples:
        raise DataError(f"no examples left from {source}: {conversations.summary()}.")
    return conversations


def own_data(conversations: Conversations, source: str, policy: str, langs: list[str] | None) -> Conversations:
    """Your own data for a policy: conversations as they are; preference pairs as pairs for a pair policy, else as
    the conversations of each prompt and its chosen reply (loss on that reply)."""
    pairs = conversations.loss_on == "pairs"
    if policy in PAIR_POLICIES and not pairs:
        raise DataError(
            f"{source}: preference pairs (--policy {policy}) come from oasst1's ranked replies or from "
            f"chosen/rejected pairs; this file holds {conversations.source_format} records, which carry no ranks."
        )
    if pairs and policy not in PAIR_POLICIES:
        chosen = [
            {"messages": e["prompt"] + e["chosen"], "id": e["id"], "tree_id": e["tree_id"]}
            for e in conversations.examples
        ]
        conversations = Conversations(chosen, "last", conversations.counts, conversations.source_format)
    if policy == "replies":
        logger.warning("--policy replies applies to oasst1 data; your conversations are used whole.")
    if langs:
        logger.warning("--langs applies to oasst1 data (its lang column); your conversations are used whole.")
    logger.info("%s: %s", source, conversations.summary())
    if not conversations.examples:
        raise DataError(f"no examples left from {source}: {conversations.summary()}.")
    return conversations


def held_out_trees(examples: list[dict], dev_fraction: float, test_fraction: float = 0.0) -> tuple[set, set]:
    """Disjoint dev and test sets of round(fraction x trees) whole trees, in a stable order of their ids' hashes (the
    same trees in every run, whatever the policy): dev from the start of that order, test from its end. Adding a test
    part never moves the dev trees, and never takes trees that a run without one evaluated on (chose settings by)."""
    trees = sorted({e["tree_id"] for e in examples}, key=lambda t: hashlib.sha256(t.encode()).hexdigest())

    def count(fraction: float) -> int:
        return max(1, round(fraction * len(trees))) if fraction > 0 else 0

    return set(trees[: count(dev_fraction)]), set(trees[len(trees) - count(test_fraction) :])


def split_by_tree(examples: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out round(fraction x trees) whole trees, chosen by a hash of their id (stable across runs)."""
    held_out, _ = held_out_trees(examples, eval_fraction)
    return [e for e in examples if e["tree_id"] not in held_out], [e for e in examples if e["tree_id"] in held_out]


def load_train_and_eval(
    data_args, held_out_policy: str = "best"
) -> tuple[Conversations, Conversations | None, Conversations | None]:
    """Training, dev and test conversations for a run's DataArguments (dev, test: None when there is none).

    Held-out conversations are always the best-ranked multi-turn paths of their trees with loss on every assistant
    turn, whatever the training policy, so held-out figures compare across runs; they are never filtered by length
    (the report scores a long one on the tokens that fit). The test part (--test_fraction) is for the final report
    only: training never sees it, and settings are chosen on dev. With a pair policy as `held_out_policy`, the dev and
    test parts are the preference pairs of those same trees (the report's preference accuracy; DPO's dev loss)."""
    langs = data_args.lang_list
    policy = "best" if data_args.policy == "auto" else data_args.policy  # train.py resolves auto by --method
    train = load_conversations(data_args.dataset, data_args.dataset_split, policy, langs)
    dev = test = None
    if data_args.eval_dataset:
        dev = load_conversations(data_args.eval_dataset, "train", held_out_policy, langs)
    elif data_args.dataset in ("hub", HUB_DATASET) and data_args.eval_split:
        dev = load_conversations(data_args.dataset, data_args.eval_split, held_out_policy, langs)
    fractions = (0.0 if dev else data_args.eval_fraction, data_args.test_fraction)
    if any(fraction > 0 for fraction in fractions):
        loaded = {policy: train}

        def policy_examples(policy: str) -> Conversations:
            if policy not in loaded:
                loaded[policy] = load_conversations(data_args.dataset, data_args.dataset_split, policy, langs)
            return loaded[policy]

        # The held-out trees are chosen among the best paths' trees, whatever the policies (the same trees always).
        dev_trees, test_trees = held_out_trees(policy_examples("best").examples, *fractions)
        whole = policy_examples(held_out_policy)
        if dev_trees:
            dev = Conversations([e for e in whole.examples if e["tree_id"] in dev_trees], whole.loss_on)
        if test_trees:
            test = Conversations([e for e in whole.examples if e["tree_id"] in test_trees], whole.loss_on)
        train.examples = [e for e in train.examples if e["tree_id"] not in test_trees | dev_trees]
        logger.info(
            "Held out %d trees for dev and %d for test; %d examples left for training.",
            len(dev_trees),
            len(test_trees),
            len(train.examples),
        )
    return train, dev, test


def pair_record(pair: dict) -> dict:
    """A preference pair in TRL's conversational format, with each side's text in the template (no EOS): the prompt
    ending at "### Assistant:" (the generation prompt) and each reply as the text that follows it."""
    prompt = portable_template().render(messages=pair["prompt"], add_generation_prompt=True, eos_token="")
    record = {key: pair[key] for key in ("prompt", "chosen", "rejected")}
    for side in ("chosen", "rejected"):
        full = format_text(pair["prompt"] + pair[side])
        assert full.startswith(prompt), "the generation prompt is a prefix of the conversation"
        record[f"{side}_text"] = full[len(prompt) :]
    return {**record, "prompt_text": prompt}


# ---------------------------------------------------------------------------------------------------------------
# CLI: preview and export


@dataclass
class ExportArguments:
    out: str = field(default="conversations.jsonl", metadata={"help": "Where to write the examples (jsonl)."})


def main(args: list[str] | None = None) -> Conversations:
    parser = argument_parser((DataArguments, ExportArguments), description=__doc__)
    try:
        data_args, export_args = parser.parse_args_into_dataclasses(args)
        if data_args.policy == "auto":
            data_args.policy = "best"
        conversations = load_conversations(
            data_args.dataset, data_args.dataset_split, data_args.policy, data_args.lang_list
        )
    except ValueError as e:  # UserError (DataError, ConfigError) included
        fail(str(e))
    out = Path(export_args.out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for e in conversations.examples:
                if conversations.loss_on == "pairs":
                    record = {**pair_record(e), "id": e["id"]}
                elif conversations.loss_on == "last":  # as prompt-completion, which trains the same when read back
                    messages = e["messages"]
                    record = {"prompt": messages[:-1], "completion": messages[-1:], "text": format_text(messages)}
                    record["id"] = e["id"]
                else:
                    record = {"messages": e["messages"], "text": format_text(e["messages"]), "id": e["id"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(out)  # never leave a half-written file under the real name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {out}: {e.strerror}.")
    trained = "" if conversations.loss_on == "pairs" else f"; loss on {conversations.loss_on} assistant turns"
    print(f"{conversations.summary()}{trained}; wrote {out}")
    return conversations


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()

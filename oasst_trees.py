"""oasst1 rows and trees -> conversations: which messages to keep, and the walks over their trees.

Messy or hostile data costs time and memory in proportion to its size, never more: every row is checked once (types,
duplicate ids), every parent chain is walked once (a loop of parent_id links, a message that is its own parent, or a
conversation deeper than MAX_DEPTH ends in one error naming the row), and every walk over a tree is a loop over an
explicit stack or a path, never recursion. A parent may come after its child, in any order. Messages whose parent is
missing or removed, or whose role does not alternate with their parent's, are left out and counted.

The conversation policies (data_utils.py's docstring tells what they keep) are `best_path_conversations` and
`reply_examples`; the preference-pair policies are `preference_pairs`.
"""

import logging
import math
from collections import Counter

from config import DataError

logger = logging.getLogger(__name__)

# Far beyond a real conversation (the deepest in the bundled sample has 6 messages). The replies policy gives every
# reply its whole context, so a chain of depth d costs d^2/4 message references: the bound keeps that in proportion.
MAX_DEPTH = 1000

# The oasst1 columns this kit reads (the Hub rows have 18; the rest are not needed to build conversations).
ROW_COLUMNS = (
    "message_id",
    "parent_id",
    "message_tree_id",
    "text",
    "role",
    "lang",
    "deleted",
    "review_result",
    "rank",
)
ROLES = ("prompter", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# Reading: trees -> rows, and each row's fields


def rows_from_trees(trees: list) -> tuple[list[dict], list[str]]:
    """An oasst1 trees export (one tree per line) -> one row per message, as in the Hub data set, and where each
    row came from (for error messages). A reply's parent is the message it is nested in."""
    rows, places = [], []
    for number, tree in enumerate(trees, start=1):
        if not isinstance(tree, dict) or not isinstance(tree.get("prompt"), dict):
            raise DataError(
                f"tree {number}: expected an oasst1 tree like the first one, "
                '{"message_tree_id": ..., "prompt": {"message_id": ..., "replies": [...]}}.'
            )
        tree_id = tree.get("message_tree_id")
        stack = [(tree["prompt"], None)]
        while stack:
            message, parent_id = stack.pop()
            place = f"tree {number}, message {short(message.get('message_id'))}"
            replies = message.get("replies") or []
            if not isinstance(replies, list) or not all(isinstance(reply, dict) for reply in replies):
                raise DataError(f"{place}: replies must be a list of message objects.")
            rows.append(
                {
                    **{k: v for k, v in message.items() if k != "replies"},
                    "parent_id": parent_id,
                    "message_tree_id": tree_id,
                }
            )
            places.append(place)
            stack.extend((reply, message.get("message_id")) for reply in reversed(replies))
    return rows, places


def flatten_trees(trees: list) -> list[dict]:
    """An oasst1 trees export -> one row per message, as in the Hub data set."""
    return rows_from_trees(trees)[0]


def check_row(row, place: str) -> None:
    """One oasst1 row: a JSON object with the columns this kit reads, each of its type (missing optional ones are
    null). Raises a DataError naming the row."""
    if not isinstance(row, dict):
        raise DataError(f"{place} lacks the oasst1 column 'message_id' (not a JSON object).")
    for column in ("message_id", "role", "text"):
        if column not in row:
            raise DataError(f"{place} lacks the oasst1 column {column!r}.")
    expected = {
        "message_id": (str,),
        "parent_id": (str, type(None)),
        "message_tree_id": (str, type(None)),
        "text": (str,),
        "lang": (str, type(None)),
        "deleted": (bool, type(None)),
        "review_result": (bool, type(None)),
        "rank": (int, float, type(None)),
    }
    for column, types in expected.items():
        value = row.get(column)
        if not isinstance(value, types) or (column == "rank" and isinstance(value, bool)):
            kind = {str: "text", bool: "true or false", int: "a number"}[types[0]]
            null = " or null" if type(None) in types else ""
            raise DataError(f"{place}: {column} must be {kind}{null}, got {short(value)} ({type(value).__name__}).")
    if row["role"] not in ROLES:
        raise DataError(f"{place}: role must be prompter or assistant, got {short(row['role'])}.")
    if not row["message_id"]:
        raise DataError(f"{place}: message_id is empty.")


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Filtering: which messages have a context


def filter_messages(rows: list, langs: list[str], places: list[str] | None = None) -> tuple[dict[str, dict], Counter]:
    """Keep reviewed, undeleted messages in `langs` whose whole ancestry is kept, with roles alternating from a
    prompter at the root; count what each filter removed. `places` names the rows in errors (default: "row N")."""
    counts = Counter(messages=len(rows))
    for name in ("deleted", "rejected", "other_language", "orphaned", "out_of_turn"):
        counts[name] = 0
    where: dict[str, str] = {}  # message_id -> its row, for duplicate ids and errors
    candidates = {}
    for index, row in enumerate(rows):
        place = places[index] if places else f"row {index + 1}"
        check_row(row, place)
        message_id = row["message_id"]
        if message_id in where:
            raise DataError(
                f"{place}: message_id {short(message_id)} is used again (first in {where[message_id]}); every "
                "message needs its own id."
            )
        where[message_id] = place
        if row.get("deleted"):
            counts["deleted"] += 1
        elif row.get("review_result") is False:
            counts["rejected"] += 1
        elif langs and row.get("lang") not in langs:
            counts["other_language"] += 1
        else:
            candidates[message_id] = row
    if langs:
        check_langs(rows, langs)
    status = context_status(candidates, where)
    kept = {message_id: row for message_id, row in candidates.items() if status[message_id] == "kept"}
    counts["orphaned"] = sum(1 for s in status.values() if s == "orphaned")
    counts["out_of_turn"] = sum(1 for s in status.values() if s == "out_of_turn")
    counts["kept"] = len(kept)
    return kept, counts


def check_langs(rows: list[dict], langs: list[str]) -> None:
    """--langs codes that no row has: an error when none is there, a warning for some."""
    present = Counter(row.get("lang") for row in rows)
    unknown = [lang for lang in langs if lang not in present]
    listed = ", ".join(f"{lang} ({n})" for lang, n in present.most_common(12) if lang) or "no lang column"
    if len(unknown) == len(langs):
        raise DataError(f"no message has the language code {', '.join(unknown)} (--langs); the data has {listed}.")
    if unknown:
        logger.warning("--langs: no message has the language code %s; the data has %s.", ", ".join(unknown), listed)


def context_status(candidates: dict[str, dict], where: dict[str, str]) -> dict[str, str]:
    """For each candidate: "kept" (its parent is kept and has the other role, or it is a prompter without a parent),
    "out_of_turn" (same role as its parent, or an assistant without one) or "orphaned" (its parent is missing or not
    kept). Each message's parent chain is walked once: a walk stops at the first message already decided."""
    status: dict[str, str] = {}
    depth: dict[str, int] = {}
    for start in candidates:
        chain, on_chain, current = [], set(), start
        while current in candidates and current not in status:  # up to a decided message, a root or a gap
            if current in on_chain:
                raise DataError(loop_message(chain, current, where))
            chain.append(current)
            on_chain.add(current)
            current = candidates[current].get("parent_id")
        for message_id in reversed(chain):  # down again, each message decided from its parent
            row = candidates[message_id]
            parent_id = row.get("parent_id")
            if parent_id is None:
                status[message_id] = "kept" if row["role"] == "prompter" else "out_of_turn"
                depth[message_id] = 1
            elif status.get(parent_id) != "kept":  # not in the data, removed, or left out itself
                status[message_id] = "orphaned"
            elif candidates[parent_id]["role"] == row["role"]:
                status[message_id] = "out_of_turn"
            else:
                status[message_id] = "kept"
                depth[message_id] = depth[parent_id] + 1
                if depth[message_id] > MAX_DEPTH:
                    raise DataError(
                        f"{where[message_id]}: message {short(message_id)} is more than {MAX_DEPTH} messages deep; "
                        f"conversations longer than {MAX_DEPTH} messages are not supported."
                    )
    return status


def loop_message(chain: list[str], repeated: str, where: dict[str, str]) -> str:
    if chain[-1] == repeated:  # its parent_id names itself
        return f"{where[repeated]}: message {short(repeated)} is its own parent; fix its parent_id or remove the row."
    loop = chain[chain.index(repeated) :] + [repeated]
    shown = " -> ".join(short(m) for m in loop) if len(loop) <= 6 else " -> ".join(short(m) for m in loop[:5]) + " ..."
    return (
        f"{where[repeated]}: message {short(repeated)} is its own ancestor (parent_id links loop: {shown}); fix the "
        "parent_id of these rows or remove them."
    )


# ---------------------------------------------------------------------------------------------------------------
# Walking the trees of kept messages


def is_ranked(reply: dict) -> bool:
    rank = reply.get("rank")
    return rank is not None and not (isinstance(rank, float) and math.isnan(rank))


def rank_order(reply: dict) -> tuple:
    """Sort key of replies, best first: lowest rank, unranked (null or NaN) last, ties to the smallest message_id."""
    ranked = is_ranked(reply)
    return not ranked, reply["rank"] if ranked else 0, reply["message_id"]


def best_reply(replies: list[dict]) -> dict:
    """The best-ranked reply (rank_order)."""
    return min(replies, key=rank_order)


class Tree:
    """Kept oasst1 messages (filter_messages: roles alternate, every parent kept) with their children, in a
    deterministic order, and the number of assistant turns on the best path below each message."""

    def __init__(self, kept: dict[str, dict]):
        self.kept = kept
        self.children: dict[str, list[dict]] = {}
        self.roots = []
        for row in kept.values():
            parent = row.get("parent_id")
            if parent is None:
                if row["role"] == "prompter":
                    self.roots.append(row)
            else:
                self.children.setdefault(parent, []).append(row)
        self._messages: dict[str, dict] = {}
        self._turns: dict[str, int] = {}
        order, stack = [], list(self.roots)
        while stack:  # every message under a root, each parent before its children
            node = stack.pop()
            order.append(node)
            stack.extend(self.children.get(node["message_id"], ()))
        for node in reversed(order):  # children before their parents: each count reads its children's
            self._turns[node["message_id"]] = self._count_turns(node)

    def _count_turns(self, row: dict) -> int:
        if row["role"] == "prompter":
            answers = self.replies(row, "assistant")
            return 1 + self._turns[best_reply(answers)["message_id"]] if answers else 0
        return max((self._turns[r["message_id"]] for r in self.replies(row, "prompter")), default=0)

    def replies(self, row: dict, role: str) -> list[dict]:
        return [r for r in self.children.get(row["message_id"], ()) if r["role"] == role]

    def best_turns(self, row: dict) -> int:
        """Assistant turns on the best path that starts at `row`."""
        return self._turns[row["message_id"]]

    def message(self, row: dict) -> dict:
        """The row as a chat message, made once: the examples that share a context share its message objects."""
        key = row["message_id"]
        if key not in self._messages:
            role = "user" if row["role"] == "prompter" else "assistant"
            self._messages[key] = {"role": role, "content": row["text"].strip()}
        return self._messages[key]

    def best_path(self, root: dict) -> list[dict]:
        path, node = [root], root
        while True:
            if node["role"] == "prompter":
                answers = self.replies(node, "assistant")
                if not answers:
                    break
                node = best_reply(answers)
            else:
                follow_ups = [r for r in self.replies(node, "prompter") if self.best_turns(r) > 0]
                if not follow_ups:
                    break
                node = min(follow_ups, key=lambda r: (-self.best_turns(r), r["message_id"]))
            path.append(node)
        if path[-1]["role"] == "prompter":
            path.pop()  # a conversation ends with the assistant
        return path

    def ancestors(self, row: dict) -> list[dict]:
        path = [row]
        while path[-1].get("parent_id") is not None:  # at most MAX_DEPTH steps (filter_messages)
            path.append(self.kept[path[-1]["parent_id"]])
        return path[::-1]


def best_path_conversations(tree: Tree) -> list[dict]:
    examples = []
    for root in tree.roots:
        path = tree.best_path(root)
        if len(path) >= 2:
            examples.append(
                {"messages": [tree.message(r) for r in path], "id": path[-1]["message_id"], "tree_id": tree_id(root)}
            )
    return examples


def reply_examples(tree: Tree) -> list[dict]:
    examples = []
    for root in tree.roots:
        stack = [root]
        while stack:  # depth-first, children in message_id order, so the output order is stable
            node = stack.pop()
            answers = tree.replies(node, "assistant") if node["role"] == "prompter" else []
            if answers:
                reply = best_reply(answers)
                examples.append(
                    {
                        "messages": [tree.message(r) for r in tree.ancestors(reply)],
                        "id": reply["message_id"],
                        "tree_id": tree_id(root),
                    }
                )
            stack.extend(
                sorted(tree.children.get(node["message_id"], ()), key=lambda r: r["message_id"], reverse=True)
            )
    return examples


def tree_id(root: dict) -> str:
    return root.get("message_tree_id") or root["message_id"]


PAIR_POLICIES = ("best_vs_rest", "all_pairs")


def preference_pairs(tree: Tree, policy: str) -> list[dict]:
    """Preference pairs from ranked sibling replies: for every kept prompter message whose kept assistant replies
    carry at least two different ranks, the context is its exact ancestor path, chosen the better-ranked reply and
    rejected a worse-ranked one. best_vs_rest: the best-ranked reply against each reply ranked below it; all_pairs:
    every two replies of different rank, better one chosen. Unranked replies, and replies that tie, never pair."""
    assert policy in PAIR_POLICIES, policy
    pairs = []
    for root in tree.roots:
        stack = [root]
        while stack:  # depth-first, children in message_id order, so the output order is stable (as reply_examples)
            node = stack.pop()
            if node["role"] == "prompter":
                ranked = sorted((r for r in tree.replies(node, "assistant") if is_ranked(r)), key=rank_order)
                better = ranked[:1] if policy == "best_vs_rest" else ranked
                context = [tree.message(r) for r in tree.ancestors(node)] if len(ranked) > 1 else []
                for i, chosen in enumerate(better):
                    for rejected in ranked[i + 1 :]:
                        if rejected["rank"] > chosen["rank"]:
                            pairs.append(
                                {
                                    "prompt": context,
                                    "chosen": [tree.message(chosen)],
                                    "rejected": [tree.message(rejected)],
                                    "id": f"{chosen['message_id']}>{rejected['message_id']}",
                                    "context_id": node["message_id"],
                                    "tree_id": tree_id(root),
                                }
                            )
            stack.extend(
                sorted(tree.children.get(node["message_id"], ()), key=lambda r: r["message_id"], reverse=True)
            )
    return pairs

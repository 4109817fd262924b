"""oasst1 -> conversations, on the real 100-tree sample."""

import json
from collections import Counter

import pytest

from chat_template import format_text
from data_utils import DataError, load_conversations, read_jsonl, split_by_tree
from oasst_trees import best_reply, flatten_trees
from training_examples import to_training_records


@pytest.fixture(scope="module")
def trees(sample_path):
    return read_jsonl(sample_path)


@pytest.fixture(scope="module")
def rows(trees):
    return flatten_trees(trees)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def all_texts(conversations):
    return [m["content"] for e in conversations.examples for m in e["messages"]]


def test_sample_counts_per_policy(sample_path, rows):
    assert len(rows) == 1167  # as SOURCE.md says
    best = load_conversations(str(sample_path), policy="best")
    replies = load_conversations(str(sample_path), policy="replies")
    # best: one conversation per tree; 55 trees end after one exchange, 45 go on to a second one.
    assert len(best.examples) == 100
    assert Counter(len(e["messages"]) for e in best.examples) == {2: 55, 4: 45}
    assert best.loss_on == "all"
    # replies: one example per prompter message that has at least one assistant reply.
    answered = {r.get("parent_id") for r in rows if r["role"] == "assistant"}
    expected = sum(1 for r in rows if r["role"] == "prompter" and r["message_id"] in answered)
    assert len(replies.examples) == expected == 254
    assert replies.loss_on == "last"
    assert best.counts["kept"] == 1167 and best.counts["orphaned"] == 0


def test_roles_alternate_and_end_with_assistant(sample_path):
    for policy in ("best", "replies"):
        for example in load_conversations(str(sample_path), policy=policy).examples:
            roles = [m["role"] for m in example["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2), roles
            assert all(m["content"] == m["content"].strip() and m["content"] for m in example["messages"])


def test_best_policy_follows_the_best_ranked_replies(sample_path, rows):
    by_id = {r["message_id"]: r for r in rows}
    children = {}
    for r in rows:
        children.setdefault(r.get("parent_id"), []).append(r)
    text_to_rows = {}
    for r in rows:
        text_to_rows.setdefault(r["text"].strip(), []).append(r)
    best = load_conversations(str(sample_path), policy="best")
    for example in best.examples:
        last = by_id[example["id"]]
        # Walk back from the last reply: every assistant on the path has the lowest rank among its siblings.
        path = [last]
        while path[-1].get("parent_id"):
            path.append(by_id[path[-1]["parent_id"]])
        path.reverse()
        assert [r["text"].strip() for r in path] == [m["content"] for m in example["messages"]]
        for message in path:
            if message["role"] == "assistant":
                siblings = [s for s in children[message["parent_id"]] if s["role"] == "assistant"]
                ranked = [s["rank"] for s in siblings if s.get("rank") is not None]
                if ranked:
                    assert message.get("rank") == min(ranked)
        # The conversation cannot be extended: the last reply has no follow-up that gets an answer.
        follow_ups = [c for c in children.get(last["message_id"], []) if c["role"] == "prompter"]
        assert not any(any(g["role"] == "assistant" for g in children.get(f["message_id"], [])) for f in follow_ups)


def test_best_reply_rule():
    replies = [
        {"message_id": "c", "rank": None},
        {"message_id": "b", "rank": 2},
        {"message_id": "a", "rank": 1},
        {"message_id": "d", "rank": 1},
    ]
    assert best_reply(replies)["message_id"] == "a"  # lowest rank, ties to the smallest id
    assert best_reply([{"message_id": "z", "rank": None}, {"message_id": "y", "rank": None}])["message_id"] == "y"


def test_replies_policy_context_and_target(sample_path, rows):
    by_id = {r["message_id"]: r for r in rows}
    replies = load_conversations(str(sample_path), policy="replies")
    assert len({e["id"] for e in replies.examples}) == len(replies.examples)
    for example in replies.examples:
        reply = by_id[example["id"]]
        assert reply["role"] == "assistant"
        assert example["messages"][-1]["content"] == reply["text"].strip()
        parent = by_id[reply["parent_id"]]
        assert example["messages"][-2]["content"] == parent["text"].strip()
    records = to_training_records(replies)
    assert records[0]["completion"][0]["role"] == "assistant" and len(records[0]["completion"]) == 1
    assert records[0]["prompt"] + records[0]["completion"] == replies.examples[0]["messages"]


def test_rows_and_trees_give_identical_conversations(sample_path, rows, tmp_path):
    hub_rows = []
    for r in rows:  # the Hub's 18 columns, null where the trees export leaves a field out
        row = {
            k: r.get(k)
            for k in (
                "message_id",
                "parent_id",
                "user_id",
                "created_date",
                "text",
                "role",
                "lang",
                "review_count",
                "review_result",
                "deleted",
                "rank",
                "synthetic",
                "model_name",
                "detoxify",
                "message_tree_id",
                "tree_state",
                "emojis",
                "labels",
            )
        }
        row["emojis"] = {"name": list((r.get("emojis") or {}).keys()), "count": list((r.get("emojis") or {}).values())}
        hub_rows.append(row)
    hub_rows.reverse()  # row order must not matter
    rows_jsonl = write_jsonl(tmp_path / "rows.jsonl", hub_rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(hub_rows), tmp_path / "rows.parquet")
    for policy in ("best", "replies"):
        from_trees = load_conversations(str(sample_path), policy=policy).examples
        for source in (rows_jsonl, tmp_path / "rows.parquet"):
            from_rows = load_conversations(str(source), policy=policy).examples
            key = lambda e: e["id"]  # noqa: E731
            assert sorted(from_rows, key=key) == sorted(from_trees, key=key)


def test_filters_remove_deleted_rejected_other_languages_and_orphans(rows, tmp_path):
    rows = [dict(r) for r in rows]
    tree_ids = list(dict.fromkeys(r["message_tree_id"] for r in rows))
    assistants = [r for r in rows if r["role"] == "assistant" and r.get("parent_id")]
    deleted, rejected = assistants[0], assistants[5]
    deleted["deleted"] = True
    deleted["text"] = "DELETED-TEXT " + deleted["text"]
    rejected["review_result"] = False
    rejected["text"] = "REJECTED-TEXT " + rejected["text"]
    for r in rows:  # one whole tree in German
        if r["message_tree_id"] == tree_ids[3]:
            r["lang"] = "de"
    # Orphans: drop a second-level prompter message from the split; its replies lose their parent.
    orphan_parent = next(
        r
        for r in rows
        if r["role"] == "prompter"
        and r.get("parent_id")
        and r["message_tree_id"] not in (tree_ids[3], deleted["message_tree_id"], rejected["message_tree_id"])
    )
    descendants, frontier = set(), {orphan_parent["message_id"]}
    while frontier:
        frontier = {r["message_id"] for r in rows if r.get("parent_id") in frontier}
        descendants |= frontier
    assert descendants  # the test needs a subtree to orphan
    rows = [r for r in rows if r["message_id"] != orphan_parent["message_id"]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def subtree(root_id):
        ids, frontier = set(), {root_id}
        while frontier:
            ids |= frontier
            frontier = {r["message_id"] for r in rows if r.get("parent_id") in frontier}
        return ids

    german = sum(1 for r in rows if r["lang"] == "de")
    for policy in ("best", "replies"):
        result = load_conversations(str(path), policy=policy, langs=["en"])
        counts = result.counts
        assert counts["deleted"] == 1 and counts["rejected"] == 1 and counts["other_language"] == german
        removed_below = (subtree(deleted["message_id"]) | subtree(rejected["message_id"])) - {
            deleted["message_id"],
            rejected["message_id"],
        }
        assert counts["orphaned"] == len(descendants) + len(removed_below)
        assert counts["kept"] == len(rows) - 2 - german - counts["orphaned"]
        texts = " ".join(all_texts(result))
        assert "DELETED-TEXT" not in texts and "REJECTED-TEXT" not in texts
        orphan_texts = {r["text"].strip() for r in rows if r["message_id"] in descendants}
        assert not orphan_texts & set(all_texts(result))
        assert not {r["text"].strip() for r in rows if r["lang"] == "de"} & set(all_texts(result))
    # All languages (the default) keeps the German tree.
    assert load_conversations(str(path)).counts["other_language"] == 0


def test_own_data_messages_and_text_lines(tmp_path):
    messages = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "user", "content": "A"},
                {"role": "assistant", "content": "B"},
                {"role": "user", "content": "C"},
                {"role": "assistant", "content": "D"},
                {"role": "user", "content": "unanswered"},
            ]
        },
    ]
    result = load_conversations(str(write_jsonl(tmp_path / "mine.jsonl", messages)))
    assert result.loss_on == "all"
    assert [len(e["messages"]) for e in result.examples] == [2, 4]  # the unanswered question is dropped
    lines = tmp_path / "mine.txt"
    lines.write_text("### Human: Hi ### Assistant: Hello! ### Human: Bye ### Assistant: See you.\n", encoding="utf-8")
    (example,) = load_conversations(str(lines)).examples
    assert example["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [messages[0], {"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(DataError, match="example 2: message 1: role 'tool' is not supported"):
        load_conversations(str(bad))


def test_split_by_tree_is_disjoint_and_stable(sample_path):
    examples = load_conversations(str(sample_path), policy="replies").examples
    train, held_out = split_by_tree(examples, 0.1)
    assert len({e["tree_id"] for e in held_out}) == 10
    assert not {e["tree_id"] for e in train} & {e["tree_id"] for e in held_out}
    assert len(train) + len(held_out) == len(examples)
    assert split_by_tree(examples, 0.1) == (train, held_out)


def test_export_cli(sample_path, tmp_path):
    from data_utils import main

    out = tmp_path / "conversations.jsonl"
    main(["--input", str(sample_path), "--out", str(out), "--policy", "best", "--langs", "en"])
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 100
    first = records[0]
    assert set(first) == {"messages", "text", "id"}
    assert first["id"] == "fa783ef0-4f4e-457d-b429-afd89edf8757"
    human, assistant = first["messages"][0]["content"], first["messages"][1]["content"]
    assert first["text"] == f"### Human: {human} ### Assistant: {assistant}"
    for record in records:
        assert record["text"] == format_text(record["messages"])
        assert "<|endoftext|>" not in record["text"]


def test_dev_and_test_parts_are_disjoint_whole_trees_of_best_paths(sample_path):
    from config import DataArguments
    from data_utils import load_train_and_eval

    args = DataArguments(dataset=str(sample_path), eval_fraction=0.2, test_fraction=0.2, policy="replies")
    train, dev, test = load_train_and_eval(args)
    trees = [{e["tree_id"] for e in part.examples} for part in (train, dev, test)]
    assert len(trees[1]) == len(trees[2]) == 20 and not (
        trees[0] & trees[1] or trees[0] & trees[2] or trees[1] & trees[2]
    )
    assert train.loss_on == "last" and dev.loss_on == test.loss_on == "all"  # held out: whole conversations, always
    assert len(dev.examples) == 20 and len(test.examples) == 20  # one best path per tree
    # Without a test part, the dev part is the same trees (runs stay comparable, and the test trees are none that a
    # run without a test part evaluated on).
    _, dev_only, none = load_train_and_eval(DataArguments(dataset=str(sample_path), eval_fraction=0.2))
    assert none is None and [e["tree_id"] for e in dev_only.examples] == [e["tree_id"] for e in dev.examples]
    assert [e["tree_id"] for e in dev.examples] == [
        e["tree_id"] for e in split_by_tree(load_conversations(str(sample_path)).examples, 0.2)[1]
    ]


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs from ranked sibling replies


def ranked_siblings(rows):
    """Independently of oasst_trees: each prompter message's ranked assistant replies, as (rank, id, text)."""
    siblings = {}
    for row in rows:
        if row["role"] == "assistant" and row.get("rank") is not None:
            siblings.setdefault(row["parent_id"], []).append((row["rank"], row["message_id"], row["text"].strip()))
    return siblings


def test_sample_pair_counts(sample_path, rows):
    best_vs_rest = load_conversations(str(sample_path), policy="best_vs_rest")
    all_pairs = load_conversations(str(sample_path), policy="all_pairs")
    assert best_vs_rest.loss_on == all_pairs.loss_on == "pairs"
    assert len(best_vs_rest.examples) == 429 and len(all_pairs.examples) == 754
    # The same counts, from the rows directly: the best rank against each worse one; every two different ranks.
    siblings = ranked_siblings(rows)
    assert sum(sum(r > min(s)[0] for r, _, _ in s) for s in siblings.values()) == 429
    assert sum(a[0] < b[0] for s in siblings.values() for a in s for b in s) == 754
    assert len({e["context_id"] for e in best_vs_rest.examples}) == 212
    assert "429 preference pairs from 212 ranked contexts" in best_vs_rest.summary()


def test_pairs_are_ranked_siblings_with_their_exact_context(sample_path, rows):
    by_id = {r["message_id"]: r for r in rows}
    pairs = load_conversations(str(sample_path), policy="best_vs_rest").examples
    for pair in pairs:
        chosen_id, rejected_id = pair["id"].split(">")
        chosen, rejected = by_id[chosen_id], by_id[rejected_id]
        assert chosen["parent_id"] == rejected["parent_id"] == pair["context_id"]
        assert chosen["rank"] == min(r for r, _, _ in ranked_siblings(rows)[pair["context_id"]])
        assert rejected["rank"] > chosen["rank"]
        assert pair["chosen"] == [{"role": "assistant", "content": chosen["text"].strip()}]
        assert pair["rejected"] == [{"role": "assistant", "content": rejected["text"].strip()}]
        # The prompt is the ancestor path, root first, ending at the parent prompter message.
        path, node = [], by_id[pair["context_id"]]
        while node is not None:
            path.append(node)
            node = by_id.get(node["parent_id"])
        assert pair["prompt"] == [
            {"role": "user" if r["role"] == "prompter" else "assistant", "content": r["text"].strip()}
            for r in reversed(path)
        ]
    assert max(len(p["prompt"]) for p in pairs) == 5  # multi-turn contexts are there (depth 6 is the deepest)


def test_unranked_and_tied_replies_never_pair(tmp_path):
    def row(message_id, parent, role, rank=None, deleted=False):
        return {
            "message_id": message_id,
            "parent_id": parent,
            "message_tree_id": "t",
            "text": message_id,
            "role": role,
            "lang": "en",
            "deleted": deleted,
            "review_result": True,
            "rank": rank,
        }

    rows = [
        row("q", None, "prompter"),
        row("a", "q", "assistant", 0),
        row("b", "q", "assistant", 1),
        row("c", "q", "assistant", 1),
        row("d", "q", "assistant"),
        row("e", "q", "assistant", 2, deleted=True),
        row("q2", "a", "prompter"),
        row("f", "q2", "assistant", 0),
        row("g", "q2", "assistant", 0),
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    best = load_conversations(str(path), policy="best_vs_rest")
    assert [p["id"] for p in best.examples] == ["a>b", "a>c"]  # d unranked, e deleted; f and g tie
    assert [p["id"] for p in load_conversations(str(path), policy="all_pairs").examples] == ["a>b", "a>c"]
    rows[3]["rank"] = 2
    all_pairs = load_conversations(str(write_jsonl(tmp_path / "rows2.jsonl", rows)), policy="all_pairs")
    assert [p["id"] for p in all_pairs.examples] == ["a>b", "a>c", "b>c"]


def test_pairs_need_oasst1_ranks(tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    with pytest.raises(DataError, match="carry no ranks"):
        load_conversations(str(chat), policy="best_vs_rest")


def test_pairs_held_out_by_the_same_trees(sample_path):
    from config import DataArguments
    from data_utils import load_train_and_eval

    args = DataArguments(dataset=str(sample_path), eval_fraction=0.2, test_fraction=0.2, policy="best_vs_rest")
    train, dev_pairs, test_pairs = load_train_and_eval(args, held_out_policy="best_vs_rest")
    _, dev, test = load_train_and_eval(args)
    assert train.loss_on == dev_pairs.loss_on == test_pairs.loss_on == "pairs" and dev.loss_on == "all"
    trees = [{e["tree_id"] for e in part.examples} for part in (train, dev_pairs, test_pairs, dev, test)]
    assert trees[1] <= trees[3] and trees[2] <= trees[4]  # the SFT dev/test trees (some have no ranked siblings)
    assert not (trees[0] & (trees[3] | trees[4]))
    assert len(train.examples) + len(dev_pairs.examples) + len(test_pairs.examples) == 429
    records = to_training_records(train)
    assert set(records[0]) == {"prompt", "chosen", "rejected"}


def test_pair_export_cli(sample_path, tmp_path, capsys):
    from data_utils import main

    out = tmp_path / "pairs.jsonl"
    main(["--input", str(sample_path), "--out", str(out), "--policy", "best_vs_rest"])
    assert "kept 1167 -> 429 preference pairs from 212 ranked contexts; wrote" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 429
    first = records[0]
    assert first["prompt_text"] == f"### Human: {first['prompt'][0]['content']} ### Assistant:"
    assert first["chosen_text"] == " " + first["chosen"][0]["content"]
    assert first["rejected_text"] == " " + first["rejected"][0]["content"]

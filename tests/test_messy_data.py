"""Messy and hostile data: loading takes bounded time and memory, and ends in valid conversations or one error.

The property tests generate oasst1 row sets and trees exports that mix valid messages with the cases a broken export
or an unkind user produces: parent_id loops, self-parents, duplicate ids, parents after their children, missing
parents, missing or mistyped columns, unknown roles, out-of-turn roles, deep chains, wide fans, huge messages, a
byte-order mark, Windows line endings and blank lines; and files of your own data in each chat format
(data_formats.py), plain or gzip, JSON lines or one JSON array, with unknown roles, non-text content parts, turns out
of order, mistyped fields and records of another format. For each, `load_conversations` must finish within
TIME_BOUND_S seconds, with a peak of traced memory within memory_bound(input size, uncompressed), and either
- return conversations whose roles alternate from a user turn and end with an assistant turn, each built only from
  kept messages (not deleted, not rejected, in --langs) along real parent links from a root (oasst1), or exactly the
  conversations and pairs the records hold (your own data); or
- raise one DataError: a single line, that names the row (or example) when one is at fault, and only when the data is
  at fault.
"""

import gzip
import json
import math
import signal
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from config import DataError
from data_utils import load_conversations
from oasst_trees import MAX_DEPTH

# Bounds the loader must meet on every input here (generated ones reach about 1 MB; the named cases below, 10 MB).
# Generous for a loader that is linear in its input, on a shared machine; a loader that loops or recurses without end
# (before this check, a parent_id loop grew past 11 GB) meets neither.
TIME_BOUND_S = 5.0


def memory_bound(input_bytes: int, messages: int) -> int:
    """Peak traced memory allowed: 1 MiB, plus 20 bytes per byte of input (Python objects are larger than their
    JSON), plus 2 * MAX_DEPTH bytes per message for the replies policy, which gives every reply its whole context: a
    chain of MAX_DEPTH messages makes MAX_DEPTH / 2 examples of MAX_DEPTH / 2 messages on average, one 8-byte
    reference each (the examples share the message objects)."""
    return 2**20 + 20 * input_bytes + 2 * MAX_DEPTH * messages


# ---------------------------------------------------------------------------------------------------------------
# Running the loader under the bounds


class TookTooLong(Exception):
    pass


def load_bounded(path: Path, policy: str = "best", langs: list[str] | None = None):
    """load_conversations(path) under a wall-clock alarm and tracemalloc: (result or DataError, seconds, peak)."""

    def alarm(signum, frame):
        raise TookTooLong(f"loading {path.name} took more than {TIME_BOUND_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S)
    try:
        outcome = load_conversations(str(path), policy=policy, langs=langs)
    except DataError as e:
        outcome = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, previous)
    assert seconds < TIME_BOUND_S
    data = path.read_bytes()
    if data.startswith(b"\x1f\x8b"):  # the bound is on the text read, not on its compressed size
        data = gzip.decompress(data)
    assert peak < memory_bound(len(data), data.count(b'"message_id"')), f"peak {peak / 2**20:.1f} MiB"
    return outcome, seconds, peak


def write_lines(path: Path, records: list, bom: bool = False, crlf: bool = False, blank: bool = False) -> Path:
    newline = "\r\n" if crlf else "\n"
    lines = [json.dumps(r, allow_nan=True) for r in records]
    if blank:
        lines = [line + newline for line in lines]  # an empty line after each record
    text = ("\ufeff" if bom else "") + newline.join(lines) + newline
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Generated data: a list of message specs, written as rows or as a trees export

MISTYPED = {
    "message_id": [5, ["m"], None, ""],
    "parent_id": [3, {"id": "m0"}],
    "text": [None, 7],
    "role": ["user", None, ["prompter"]],
    "deleted": ["yes", 1],
    "review_result": ["false", 0],
    "rank": ["1", True],
    "lang": [3],
    "message_tree_id": [12],
}
DEFECTS = ["mistyped", "missing", "not_object", "duplicate_id"]


@st.composite
def message_specs(draw, forest: bool):
    """Messages as dicts with an "index", a "parent" (an index, None for a root, or "ghost" for a missing one), the
    oasst1 fields and a "defect". forest: parents come before their children in index order (no loops)."""
    n = draw(st.integers(1, 25))
    defect_percent = draw(st.sampled_from([0, 0, 0, 5, 30]))  # most sets have no defective row: loops get walked
    specs = []
    for i in range(n):
        if forest:
            parent = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None
        else:
            parent = draw(st.one_of(st.none(), st.integers(0, n - 1), st.just("ghost")))
        padding = draw(st.sampled_from(["", " ", "\r\n", "  \t"]))
        specs.append(
            {
                "index": i,
                "parent": parent,
                "role": draw(st.sampled_from(["prompter", "assistant"])),
                # "t<index>:" first, so that each conversation's texts lead back to their rows.
                "text": f"{padding}t{i}: {draw(st.text(max_size=10))}{padding}",
                "huge": draw(st.integers(0, 40)) == 17,  # 200,000 more characters
                "deleted": draw(st.sampled_from([False, False, False, True, None, "absent"])),
                "review_result": draw(st.sampled_from([True, True, None, False, "absent"])),
                "lang": draw(st.sampled_from(["en", "en", "de", None])),
                "rank": draw(st.sampled_from([None, 0, 1, 2, 0.0, math.nan, "absent"])),
                "defect": draw(st.sampled_from(DEFECTS)) if draw(st.integers(0, 99)) < defect_percent else "none",
                "column": draw(st.sampled_from(sorted(MISTYPED))),
                "bad_value": draw(st.integers(0, 3)),
            }
        )
    bulk = draw(st.sampled_from(["none", "none", "deep", "wide"]))
    if bulk == "deep":  # a valid alternating chain
        depth = draw(st.sampled_from([120, 400, MAX_DEPTH, MAX_DEPTH + 1] if not forest else [120, 250]))
        specs += chain_specs(len(specs), depth)
    elif bulk == "wide":  # one question with thousands of ranked answers
        specs += fan_specs(len(specs), 2000)
    return specs


def plain_spec(index: int, parent, role: str, **fields) -> dict:
    return {
        "index": index,
        "parent": parent,
        "role": role,
        "text": f"t{index}: bulk",
        "deleted": False,
        "review_result": True,
        "lang": "en",
        "rank": None,
        "defect": "none",
        **fields,
    }


def chain_specs(start: int, depth: int) -> list[dict]:
    return [
        plain_spec(start + k, start + k - 1 if k else None, "prompter" if k % 2 == 0 else "assistant", depth=k + 1)
        for k in range(depth)
    ]


def fan_specs(start: int, width: int) -> list[dict]:
    return [plain_spec(start, None, "prompter")] + [
        plain_spec(start + k, start, "assistant", rank=k % 7) for k in range(1, width + 1)
    ]


def message_fields(spec: dict) -> dict:
    """The oasst1 fields of a spec, with its defect applied (a duplicate id is applied by the writer)."""
    text = spec["text"] + ("x" * 200_000 if spec.get("huge") else "")
    fields = {"message_id": f"m{spec['index']}", "text": text, "role": spec["role"]}
    for name in ("deleted", "review_result", "lang", "rank"):
        if spec[name] != "absent":
            fields[name] = spec[name]
    if spec["defect"] == "mistyped":
        options = MISTYPED[spec["column"]]
        fields[spec["column"]] = options[spec["bad_value"] % len(options)]
    elif spec["defect"] == "missing":
        fields.pop(("message_id", "text", "role")[spec["bad_value"] % 3])
    return fields


def as_rows(specs: list[dict], order: list[int]) -> list:
    rows = []
    for i in order:
        spec = specs[i]
        if spec["defect"] == "not_object":
            rows.append([f"m{i}"])
            continue
        row = message_fields(spec)
        parent = spec["parent"]
        if spec["defect"] != "mistyped" or spec["column"] != "parent_id":
            row["parent_id"] = None if parent is None else "ghost" if parent == "ghost" else f"m{parent}"
        if spec["defect"] != "mistyped" or spec["column"] != "message_tree_id":
            row["message_tree_id"] = "tree"
        if spec["defect"] == "duplicate_id" and i:
            row["message_id"] = "m0"
        rows.append(row)
    return rows


def as_trees(specs: list[dict]) -> list:
    """A trees export of a forest: each root a line, its replies nested in it."""
    nested = {}
    for spec in specs:
        if spec["defect"] == "not_object":
            nested[spec["index"]] = f"m{spec['index']}"  # a reply that is not a message object
            continue
        message = message_fields(spec)
        if spec["defect"] == "duplicate_id" and spec["index"]:
            message["message_id"] = "m0"
        message["replies"] = []
        nested[spec["index"]] = message
    trees = []
    for spec in specs:
        parent = spec["parent"]
        if parent is None:
            trees.append({"message_tree_id": f"tree{spec['index']}", "prompt": nested[spec["index"]]})
        elif isinstance(nested[parent], dict):
            nested[parent]["replies"].append(nested[spec["index"]])
    return trees


# ---------------------------------------------------------------------------------------------------------------
# What a correct answer is


def is_defective(spec: dict, trees: bool) -> bool:
    if trees and spec["defect"] == "mistyped" and spec["column"] in ("parent_id", "message_tree_id"):
        return False  # in a trees export the nesting says both; a message's own values are not read
    return spec["defect"] in ("mistyped", "missing", "not_object") or (
        spec["defect"] == "duplicate_id" and spec["index"]
    )


def is_candidate(spec: dict, langs: list[str]) -> bool:
    """Not removed by a filter (deleted, rejected in review, other language)."""
    return spec["deleted"] is not True and spec["review_result"] is not False and (not langs or spec["lang"] in langs)


def has_loop(specs: list[dict], langs: list[str]) -> bool:
    """Whether parent links among the filters' survivors loop (what the loader must refuse)."""
    candidates = {s["index"]: s for s in specs if is_candidate(s, langs)}
    for spec in candidates.values():
        seen, current = set(), spec["index"]
        while current in candidates:
            if current in seen:
                return True
            seen.add(current)
            current = candidates[current]["parent"]
    return False


def check_outcome(outcome, specs: list[dict], langs: list[str], tree_parents: bool = False) -> None:
    defective = any(is_defective(s, tree_parents) for s in specs)
    too_deep = any(s.get("depth", 0) > MAX_DEPTH for s in specs) and (not langs or "en" in langs)
    must_fail = defective or (not tree_parents and has_loop(specs, langs)) or too_deep
    if isinstance(outcome, DataError):
        message = str(outcome)
        # One line; the longest, for a first row that is not a JSON object, lists the formats with an example each.
        assert "\n" not in message and len(message) < 1000, message
        data_is_fine = ("no examples left from", "no message has the language code")
        if not must_fail:
            assert any(phrase in message for phrase in data_is_fine), message
        elif not any(phrase in message for phrase in data_is_fine):
            names_the_row = ("row ", "tree ", "rows lack", "example 1", ":1: expected")
            assert any(words in message for words in names_the_row), message
        return
    assert not must_fail, "defective data loaded without an error"
    by_index = {f"t{s['index']}": s for s in specs}
    for example in outcome.examples:
        messages = example["messages"]
        roles = [m["role"] for m in messages]
        assert len(roles) >= 2 and roles == ["user", "assistant"] * (len(roles) // 2), roles
        path = [by_index[m["content"].split(":")[0]] for m in messages]  # a KeyError here: text that no row has
        assert path[0]["parent"] is None
        for parent, child in zip(path, path[1:], strict=False):
            assert child["parent"] == parent["index"]
        assert all(is_candidate(s, langs) for s in path)


SETTINGS = settings(
    max_examples=60,
    deadline=None,  # the bounds above are the time limit; hypothesis's own would count generation too
    database=None,  # nothing written into the repository; a failure prints its reproduction blob
    print_blob=True,
    # No shrinking: each try of an input that hangs costs the whole time bound, and a shrink makes hundreds of tries.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENCODINGS = st.fixed_dictionaries({"bom": st.booleans(), "crlf": st.booleans(), "blank": st.booleans()})
LANGS = st.sampled_from([[], ["en"], ["de", "en"], ["de"], ["fr"]])
POLICIES = st.sampled_from(["best", "replies"])


@SETTINGS
@given(specs=message_specs(forest=False), order=st.randoms(), langs=LANGS, policy=POLICIES, encoding=ENCODINGS)
def test_messy_rows_load_in_bounded_time_and_memory(tmp_path_factory, specs, order, langs, policy, encoding):
    positions = list(range(len(specs)))
    order.shuffle(positions)  # parents before or after their children
    path = write_lines(tmp_path_factory.mktemp("rows") / "rows.jsonl", as_rows(specs, positions), **encoding)
    outcome, _, _ = load_bounded(path, policy, langs)
    check_outcome(outcome, specs, langs)


@SETTINGS
@given(specs=message_specs(forest=True), langs=LANGS, policy=POLICIES, encoding=ENCODINGS)
def test_messy_trees_exports_load_in_bounded_time_and_memory(tmp_path_factory, specs, langs, policy, encoding):
    path = write_lines(tmp_path_factory.mktemp("trees") / "trees.jsonl", as_trees(specs), **encoding)
    outcome, _, _ = load_bounded(path, policy, langs)
    check_outcome(outcome, specs, langs, tree_parents=True)


# ---------------------------------------------------------------------------------------------------------------
# Your own data: generated records of each chat format, and what each must read as

USER_FORMATS = ["messages", "ShareGPT", "Alpaca", "prompt-completion", "preference pairs", "text"]
# The defects a record can have in each format; each must end in one error naming an example.
USER_DEFECTS = {
    "messages": ["role", "image", "order", "mistyped", "other_format", "not_object"],
    "ShareGPT": ["role", "order", "mistyped", "other_format", "not_object"],
    "Alpaca": ["mistyped", "other_format", "not_object"],
    "prompt-completion": ["role", "image", "order", "mistyped", "other_format", "not_object"],
    "preference pairs": ["role", "image", "order", "mistyped", "other_format", "not_object"],
    "text": ["order", "mistyped", "other_format", "not_object"],
}
# No "#" (text lines split on "### Human:"), and no line breaks but the padding's (a .txt file has a record per line).
SAFE_TEXT = st.text(st.characters(blacklist_characters="#\r\n", blacklist_categories=("Cs",)), max_size=8)


@st.composite
def user_record_specs(draw):
    """(format, record specs): each spec a conversation ("system", "turns": texts alternating from the user, their
    "parts" as content parts or not), the extra fields of its format and a "defect"."""
    fmt = draw(st.sampled_from(USER_FORMATS))
    defect_percent = draw(st.sampled_from([0, 0, 5, 30]))
    count = draw(st.sampled_from([12, 1, 3, 12, 300]))
    specs = []
    for i in range(count):
        padding = draw(st.sampled_from(["", " "] if fmt == "text" else ["", " ", "\n"]))
        spec = {
            "system": draw(st.booleans()) and fmt not in ("text", "Alpaca"),
            "turns": [f"{padding}r{i}t{k}: {draw(SAFE_TEXT)}{padding}" for k in range(draw(st.integers(0, 5)))],
            "parts": draw(st.booleans()),
            "huge": count < 100 and draw(st.integers(0, 40)) == 17,  # 200,000 more characters in the last turn
            "input": draw(st.sampled_from(["absent", None, "", " more"])),
            "implicit": draw(st.booleans()),  # preference pairs: the prompt in "chosen" and "rejected"
            "defect": draw(st.sampled_from(USER_DEFECTS[fmt])) if draw(st.integers(0, 99)) < defect_percent else None,
        }
        if fmt in ("Alpaca", "prompt-completion", "preference pairs") or (fmt == "text" and not spec["turns"]):
            spec["turns"] = spec["turns"] + [f"r{i}t{k}: x" for k in range(len(spec["turns"]), 2)]
            if fmt != "Alpaca" and len(spec["turns"]) % 2:  # a prompt and its reply: the last turn the assistant's
                spec["turns"].append(f"r{i}t{len(spec['turns'])}: reply")
            if fmt == "Alpaca":
                spec["turns"] = spec["turns"][:2]
        if spec["huge"] and spec["turns"]:
            spec["turns"][-1] += "x" * 200_000
        if spec["defect"] in ("other_format", "not_object") and i == 0:
            spec["defect"] = "role" if "role" in USER_DEFECTS[fmt] else "mistyped"  # the first record sets the format
        specs.append(spec)
    return fmt, specs


def spec_messages(spec: dict) -> list[dict]:
    system = [{"role": "system", "content": "Be brief."}] if spec["system"] else []
    return system + [
        {"role": "user" if k % 2 == 0 else "assistant", "content": text} for k, text in enumerate(spec["turns"])
    ]


def with_defect(messages: list[dict], defect: str | None) -> list[dict]:
    """Messages as a user's file holds them, broken as the defect says (role, image, order, mistyped)."""
    messages = [dict(m) for m in messages]
    if defect in ("image", "mistyped") and not messages:
        messages.append({"role": "user", "content": "x"})
    if defect == "role":
        messages.insert(len(messages) // 2, {"role": "tool", "content": "{}"})
    elif defect == "image":
        messages[-1]["content"] = [{"type": "image_url", "image_url": {"url": "cat.png"}}]
    elif defect == "order":
        messages.insert(len(messages) - 1, {"role": "assistant", "content": "again"})
        messages.insert(len(messages) - 1, {"role": "assistant", "content": "and again"})
    elif defect == "mistyped":
        messages[-1]["content"] = 7
    return messages


def as_user_record(fmt: str, spec: dict):
    defect = spec["defect"]
    if defect == "not_object":
        return [spec["turns"][0]]
    if defect == "other_format":
        return {"instruction": "a", "output": "b"} if fmt != "Alpaca" else {"prompt": "a", "completion": "b"}
    messages = with_defect(spec_messages(spec), defect if fmt != "text" else None)
    if spec["parts"]:
        for m in messages:
            if isinstance(m["content"], str):
                m["content"] = [{"type": "text", "text": m["content"]}]
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "ShareGPT":
        names = {"user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names.get(m["role"], m["role"]), "value": m["content"]} for m in messages]}
    if fmt == "Alpaca":
        instruction, output = spec["turns"]
        record = {"instruction": instruction, "output": 7 if defect == "mistyped" else output}
        return record if spec["input"] == "absent" else {**record, "input": spec["input"]}
    if fmt == "prompt-completion":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if fmt == "preference pairs":
        rejected = {"role": "assistant", "content": "worse"}
        if spec["implicit"]:
            return {"chosen": messages, "rejected": messages[:-1] + [rejected]}
        return {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": [rejected]}
    line = " ".join(f"{'### Human:' if k % 2 == 0 else '### Assistant:'} {t}" for k, t in enumerate(spec["turns"]))
    if defect == "order":
        line = "### Human: first " + line  # two human turns in a row
    return {"text": line} if defect != "mistyped" else {"text": 7}


def expected_user_examples(fmt: str, specs: list[dict]) -> tuple[list, int]:
    """What a correct reader makes of defect-free records: the examples (conversations or (prompt, chosen, rejected)),
    and how many records are dropped without an assistant reply."""
    examples, dropped = [], 0
    for spec in specs:
        messages = [{**m, "content": m["content"].strip()} for m in spec_messages(spec)]
        if fmt == "Alpaca":
            request = [messages[-2]["content"]] + (
                [spec["input"].strip()] if spec["input"] not in ("absent", None) else []
            )
            messages = messages[:-2] + [
                {"role": "user", "content": "\n\n".join(p for p in request if p)},
                messages[-1],
            ]
        if fmt == "preference pairs":
            examples.append((messages[:-1], messages[-1], {"role": "assistant", "content": "worse"}))
            continue
        if messages and messages[-1]["role"] == "user":
            messages = messages[:-1]
        if any(m["role"] == "assistant" for m in messages):
            examples.append(messages)
        else:
            dropped += 1
    return examples, dropped


def write_user_file(folder: Path, fmt: str, records: list, layout: str, encoding: dict) -> Path:
    suffix = ".txt" if layout == "text lines" else ".json" if layout == "array" else ".jsonl"
    path = folder / f"data{suffix}{'.gz' if encoding['gzip'] else ''}"
    if layout == "text lines":
        text = "".join(
            r["text"] + "\n" if isinstance(r, dict) and isinstance(r.get("text"), str) else "no text\n"
            for r in records
        )
        path.write_text(text, encoding="utf-8")
    elif layout == "array":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        write_lines(path, records, **{k: v for k, v in encoding.items() if k != "gzip"})
    if encoding["gzip"]:
        path.write_bytes(gzip.compress(path.read_bytes()))
    return path


@settings(SETTINGS, max_examples=120)  # six formats, each in several layouts
@given(
    generated=user_record_specs(),
    layout=st.sampled_from(["array", "lines", "text lines", "lines"]),
    encoding=st.fixed_dictionaries(
        {"gzip": st.sampled_from([True, False]), "bom": st.booleans(), "crlf": st.booleans(), "blank": st.booleans()}
    ),
    policy=st.sampled_from(["best", "best_vs_rest"]),
)
def test_your_own_data_in_every_format_loads_in_bounded_time_and_memory(
    tmp_path_factory, generated, layout, encoding, policy
):
    fmt, specs = generated
    if layout == "text lines" and fmt != "text":
        layout = "lines"
    if fmt != "preference pairs":
        policy = "best"
    records = [as_user_record(fmt, spec) for spec in specs]
    path = write_user_file(tmp_path_factory.mktemp("own"), fmt, records, layout, encoding)
    outcome, _, _ = load_bounded(path, policy)
    if any(spec["defect"] for spec in specs):
        assert isinstance(outcome, DataError), "a defective record loaded without an error"
        message = str(outcome)
        assert "\n" not in message and message.startswith(f"{path}: example "), message
        return
    expected, dropped = expected_user_examples(fmt, specs)
    if not expected:
        assert isinstance(outcome, DataError) and str(outcome).startswith(f"no examples left from {path}: "), outcome
        return
    assert not isinstance(outcome, DataError), outcome
    assert (outcome.counts["records"], outcome.counts["no_reply"]) == (len(specs), dropped)
    if policy == "best_vs_rest":
        assert [(e["prompt"], *e["chosen"], *e["rejected"]) for e in outcome.examples] == expected
    elif fmt == "preference pairs":  # the conversations of each prompt and its chosen reply
        assert [e["messages"] for e in outcome.examples] == [prompt + [chosen] for prompt, chosen, _ in expected]
    else:
        assert [e["messages"] for e in outcome.examples] == expected


@pytest.mark.parametrize("fmt", USER_FORMATS)
def test_thousands_of_records_in_each_format(tmp_path, fmt):
    """5,000 two-exchange records (a system message first, content parts in every other one), as gzip-compressed
    JSON lines and as one JSON array: within the bounds, and every one kept."""
    specs = [
        {
            "system": fmt not in ("text", "Alpaca"),
            "turns": [f"r{i}t{k}: a few words" for k in range(2 if fmt == "Alpaca" else 4)],
            "parts": i % 2 == 0,
            "input": "more",
            "implicit": i % 2 == 0,
            "defect": None,
        }
        for i in range(5000)
    ]
    records = [as_user_record(fmt, spec) for spec in specs]
    expected, _ = expected_user_examples(fmt, specs)
    policy = "best_vs_rest" if fmt == "preference pairs" else "best"
    for layout, compressed in (("lines", True), ("array", False)):
        encoding = {"gzip": compressed, "bom": False, "crlf": False, "blank": False}
        outcome, _, _ = load_bounded(write_user_file(tmp_path, fmt, records, layout, encoding), policy)
        assert len(outcome.examples) == len(expected) == 5000


# ---------------------------------------------------------------------------------------------------------------
# Named cases, with their exact outcome


def row(message_id, parent_id, role, text=None, **fields) -> dict:
    return {"message_id": message_id, "parent_id": parent_id, "role": role, "text": text or message_id, **fields}


def load_error(path: Path, policy: str = "best") -> str:
    outcome, _, _ = load_bounded(path, policy)
    assert isinstance(outcome, DataError), "expected an error"
    return str(outcome)


@pytest.mark.parametrize("policy", ["best", "replies"])
def test_two_messages_naming_each_other_as_parents(tmp_path, policy):
    # Before: the ancestry walk never ended, and its memory grew past 11 GB.
    path = write_lines(tmp_path / "loop.jsonl", [row("a", "b", "prompter"), row("b", "a", "assistant")])
    assert load_error(path, policy) == (
        f"{path}: row 1: message 'a' is its own ancestor (parent_id links loop: 'a' -> 'b' -> 'a'); fix the "
        "parent_id of these rows or remove them."
    )


def test_a_message_that_is_its_own_parent(tmp_path):
    rows = [row("q", None, "prompter"), row("a", "q", "assistant"), row("x", "x", "prompter")]
    path = write_lines(tmp_path / "self.jsonl", rows)
    assert load_error(path) == f"{path}: row 3: message 'x' is its own parent; fix its parent_id or remove the row."


def test_a_long_loop_is_named_by_its_first_ids(tmp_path):
    rows = [row(f"m{i}", f"m{(i + 1) % 5000}", "prompter" if i % 2 else "assistant") for i in range(5000)]
    path = write_lines(tmp_path / "long-loop.jsonl", rows)
    assert load_error(path) == (
        f"{path}: row 1: message 'm0' is its own ancestor (parent_id links loop: 'm0' -> 'm1' -> 'm2' -> 'm3' -> "
        "'m4' ...); fix the parent_id of these rows or remove them."
    )


def test_duplicate_message_ids(tmp_path):
    rows = [row("q", None, "prompter"), row("a", "q", "assistant"), row("q", None, "prompter", "again")]
    path = write_lines(tmp_path / "dup.jsonl", rows)
    assert (
        load_error(path)
        == f"{path}: row 3: message_id 'q' is used again (first in row 1); every message needs its own id."
    )


@pytest.mark.parametrize(
    "changed, expected",
    [
        ({"rank": "1"}, "row 2: rank must be a number or null, got '1' (str)."),
        ({"deleted": "no"}, "row 2: deleted must be true or false or null, got 'no' (str)."),
        ({"parent_id": ["q"]}, "row 2: parent_id must be text or null, got ['q'] (list)."),
        ({"text": None}, "row 2: text must be text, got None (NoneType)."),
        ({"message_id": 7}, "row 2: message_id must be text, got 7 (int)."),
        ({"role": "user"}, "row 2: role must be prompter or assistant, got 'user'."),
        ({"lang": {"code": "en"}}, "row 2: lang must be text or null, got {'code': 'en'} (dict)."),
    ],
)
def test_mistyped_columns_name_the_row(tmp_path, changed, expected):
    path = write_lines(
        tmp_path / "rows.jsonl", [row("q", None, "prompter"), {**row("a", "q", "assistant"), **changed}]
    )
    assert load_error(path) == f"{path}: {expected}"


def test_a_missing_column_names_the_row(tmp_path):
    answer = row("a", "q", "assistant")
    del answer["text"]
    path = write_lines(tmp_path / "rows.jsonl", [row("q", None, "prompter"), answer])
    assert load_error(path) == f"{path}: row 2 lacks the oasst1 column 'text'."


def test_parents_after_their_children_and_out_of_turn_messages(tmp_path):
    rows = [
        row("a2", "q2", "assistant", "Fine, thanks."),
        row("q2", "a1", "prompter", "How are you?"),
        row("a1", "q1", "assistant", "Hello!"),
        row("q1", None, "prompter", "Hi"),
        row("q3", "q1", "prompter", "A second question right after the first"),  # out of turn
        row("a3", "q3", "assistant", "Below an out-of-turn message"),  # orphaned
        row("lone", None, "assistant", "An answer without a question"),  # out of turn
    ]
    outcome, _, _ = load_bounded(write_lines(tmp_path / "rows.jsonl", rows))
    assert [[m["content"] for m in e["messages"]] for e in outcome.examples] == [
        ["Hi", "Hello!", "How are you?", "Fine, thanks."]
    ]
    assert outcome.summary() == (
        "7 messages: removed 0 deleted, 0 rejected in review, 0 in other languages, 1 orphaned (parent missing or "
        "removed), 2 out of turn (same role as the parent); kept 4 -> 1 examples"
    )


def chain(depth: int) -> list[dict]:
    return [
        row(f"m{k:04d}", f"m{k - 1:04d}" if k else None, "prompter" if k % 2 == 0 else "assistant")
        for k in range(depth)
    ]


def test_a_chain_of_the_deepest_supported_conversation(tmp_path):
    path = write_lines(tmp_path / "deep.jsonl", chain(MAX_DEPTH)[::-1])  # every child before its parent
    best, _, _ = load_bounded(path, "best")
    (conversation,) = best.examples
    assert len(conversation["messages"]) == MAX_DEPTH
    replies, _, _ = load_bounded(path, "replies")
    assert [len(e["messages"]) for e in replies.examples] == list(range(2, MAX_DEPTH + 1, 2))


def test_a_chain_deeper_than_supported(tmp_path):
    path = write_lines(tmp_path / "deeper.jsonl", chain(MAX_DEPTH + 1))
    assert load_error(path) == (
        f"{path}: row {MAX_DEPTH + 1}: message 'm{MAX_DEPTH:04d}' is more than {MAX_DEPTH} messages deep; "
        f"conversations longer than {MAX_DEPTH} messages are not supported."
    )


@pytest.mark.parametrize("policy", ["best", "replies"])
def test_a_question_with_ten_thousand_answers(tmp_path, policy):
    answers = [row(f"a{k:05d}", "q", "assistant", rank=(k * 7919) % 10_000) for k in range(10_000)]
    path = write_lines(tmp_path / "wide.jsonl", [row("q", None, "prompter"), *answers])
    outcome, _, _ = load_bounded(path, policy)
    (example,) = outcome.examples
    assert example["id"] == "a00000"  # rank 0


def test_a_huge_message(tmp_path):
    text = "word " * 2_000_000  # 10 MB
    path = write_lines(
        tmp_path / "huge.jsonl", [row("q", None, "prompter", "Say it"), row("a", "q", "assistant", text)]
    )
    outcome, _, _ = load_bounded(path)
    assert outcome.examples[0]["messages"][1]["content"] == text.strip()


def test_a_trees_export_nested_deeper_than_json_can_be_read(tmp_path):
    # Written by hand: json.dumps would hit the same recursion limit.
    depth = 2000
    text = (
        '{"message_tree_id": "t", "prompt": '
        + '{"message_id": "m", "role": "prompter", "text": "x", "replies": [' * depth
    )
    path = tmp_path / "trees.jsonl"
    path.write_text(text + "]}" * depth + "}\n", encoding="utf-8")
    assert load_error(path) == (
        f"{path}:1: nested deeper than Python's JSON reader can follow; a trees export this deep can be written as "
        "rows, one message per line."
    )


def test_a_trees_export_with_a_line_that_is_not_a_tree(tmp_path):
    tree = {"message_tree_id": "t", "prompt": row("q", None, "prompter") | {"replies": [row("a", None, "assistant")]}}
    path = write_lines(tmp_path / "trees.jsonl", [tree, {"message_id": "x", "text": "stray row", "role": "prompter"}])
    assert load_error(path) == (
        f"{path}: tree 2: expected an oasst1 tree like the first one, "
        '{"message_tree_id": ..., "prompt": {"message_id": ..., "replies": [...]}}.'
    )


def test_a_trees_export_names_the_tree_and_message_of_a_bad_field(tmp_path):
    reply = row("a", None, "assistant", rank="best")
    tree = {"message_tree_id": "t", "prompt": row("q", None, "prompter") | {"replies": [reply]}}
    path = write_lines(tmp_path / "trees.jsonl", [tree])
    assert load_error(path) == f"{path}: tree 1, message 'a': rank must be a number or null, got 'best' (str)."


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_byte_order_mark_and_windows_line_endings(tmp_path, suffix):
    conversations = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]},
    ]
    if suffix == ".jsonl":
        plain = write_lines(tmp_path / "plain.jsonl", conversations)
        windows = write_lines(tmp_path / "windows.jsonl", conversations, bom=True, crlf=True, blank=True)
    else:
        lines = ["### Human: Hi ### Assistant: Hello!", "### Human: Bye ### Assistant: See you."]
        plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
        plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
        windows.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    expected = [[m["content"] for m in c["messages"]] for c in conversations]
    for path in (plain, windows):
        outcome, _, _ = load_bounded(path)
        assert [[m["content"] for m in e["messages"]] for e in outcome.examples] == expected


def test_oasst1_rows_with_a_byte_order_mark_and_windows_line_endings(tmp_path, sample_path):
    plain = load_conversations(str(sample_path), policy="replies").examples
    windows = tmp_path / "trees.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + sample_path.read_bytes().replace(b"\n", b"\r\n"))
    assert load_conversations(str(windows), policy="replies").examples == plain

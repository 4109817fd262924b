"""Data files as users have them: compressed or not, in the chat formats of the ecosystem -> the kit's examples.

A local file is UTF-8 text (a byte-order mark and Windows line endings are fine), gzip-compressed or not: gzip is
recognised by its first bytes, whatever the file's name. It holds one JSON record per line, or (a .json file) one JSON
array of records, or (a .txt file) one "### Human: ... ### Assistant: ..." conversation per line. The format is
detected from the first record, and every record must be in it (FORMATS shows a record of each). Every record
becomes the one shape the rest of the kit reads, so training, the held-out split, the report and the export
(data_utils.py --out) need no code per format:
- a conversation, {"messages": [...], "id": ..., "tree_id": ...}: an optional system message first (the template
  opens the first human turn with its text, which carries no loss), then user and assistant turns alternating from
  the user; message contents are text;
- a preference pair, {"prompt": [...], "chosen": [reply], "rejected": [reply], "id": ..., "tree_id": ...}, as
  data_utils.py builds them from oasst1's ranked replies.
oasst1 rows and trees exports are recognised here too, and read by oasst_trees.py.

Each record is read once, as it streams from the file, so time and memory grow in proportion to the file's size.
"""

import gzip
import itertools
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from chat_template import ASSISTANT, HUMAN
from config import DataError
from oasst_trees import short

# Every format: its name in the log, and one record of it, as the error for an unknown shape shows them.
FORMATS = {
    "oasst1 trees": '{"message_tree_id": ..., "prompt": {"message_id": ..., "text": ..., "replies": [...]}}',
    "oasst1 rows": '{"message_id": ..., "parent_id": ..., "role": "prompter", "text": ...}',
    "preference pairs": '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}',
    "prompt-completion": '{"prompt": "Hi", "completion": "Hello!"}',
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "ShareGPT": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "Alpaca": '{"instruction": "Greet me.", "input": "", "output": "Hello!"}',
    "text": '{"text": "### Human: Hi ### Assistant: Hello!"}',
}

# Roles as the formats name them: OpenAI's (messages) and ShareGPT's ("from": human, gpt).
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

# Compressions a file may be in that this kit does not read, by their first bytes: said as such, not as "not UTF-8".
OTHER_COMPRESSIONS = {
    b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
    b"BZh": ("bzip2", "bunzip2"),
    b"\xfd7zXZ\x00": ("xz", "unxz"),
    b"PK\x03\x04": ("zip", "unzip"),
}


# ---------------------------------------------------------------------------------------------------------------
# Files -> records


def uncompressed_name(path: Path) -> Path:
    """data.jsonl.gz -> data.jsonl: the name that says what the text is."""
    return path.with_suffix("") if path.suffix == ".gz" else path


def open_text(path: Path):
    """The file's text, decompressed if it is gzip (by its first bytes)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    for magic, (name, command) in OTHER_COMPRESSIONS.items():
        if head.startswith(magic):
            raise DataError(
                f"{path} is {name}-compressed: decompress it first ({command}); gzip-compressed files are read as "
                "they are."
            )
    return open(path, encoding="utf-8-sig")


def read_records(path: Path) -> Iterator[tuple[int, object]]:
    """(number, record) for each record of a data file, as it is read: its JSON lines (blank lines skipped; the
    number is the line's), the elements of a .json file that holds one JSON array, or a .txt file's text lines."""
    kind = uncompressed_name(path).suffix
    try:
        with open_text(path) as f:
            lines = ((number, line) for number, line in enumerate(f, start=1) if line.strip())
            if kind in (".txt", ".text"):
                yield from lines
                return
            first = next(lines, None)
            if first and kind == ".json" and first[1].lstrip().startswith("["):
                records = parse_json(first[1] + f.read(), path, first[0])
                if not isinstance(records, list):
                    raise DataError(f"{path}: expected one JSON array of records, or one JSON record per line.")
                yield from enumerate(records, start=1)
                return
            for number, line in itertools.chain([first] if first else [], lines):
                yield number, parse_json(line.rstrip("\n"), path, number)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and try again.") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a gzip file cut short or damaged
        raise DataError(f"{path}: the gzip data is damaged ({e}); download or compress it again.") from None


def parse_json(text: str, path: Path, number: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number + e.lineno - 1}: not valid JSON ({e.msg}).") from None
    except ValueError as e:  # an integer longer than Python's limit on digits
        raise DataError(f"{path}:{number}: not valid JSON ({e}).") from None
    except RecursionError:
        raise DataError(
            f"{path}:{number}: nested deeper than Python's JSON reader can follow; a trees export this deep can be "
            "written as rows, one message per line."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Records -> the format, and each format -> conversations or preference pairs


def record_format(record) -> str | None:
    """The format a record is in (a key of FORMATS), or None."""
    if isinstance(record, str):
        return "text"
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("prompt"), dict):
        return "oasst1 trees"
    if any(key in record for key in ("message_id", "parent_id", "message_tree_id")):
        return "oasst1 rows"
    if "chosen" in record and "rejected" in record:
        return "preference pairs"
    for name, keys in (
        ("prompt-completion", ("prompt", "completion")),
        ("messages", ("messages",)),
        ("ShareGPT", ("conversations",)),
        ("Alpaca", ("instruction", "output")),
    ):
        if all(key in record for key in keys):
            return name
    return "text" if isinstance(record.get("text"), str) else None


def unknown_format_message(record, path: Path, number: int) -> str:
    if isinstance(record, dict):
        keys = list(record)
        shape = "keys " + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") if keys else "no keys"
    else:
        shape = {list: "a JSON array", bool: "true or false", int: "a number", float: "a number"}.get(
            type(record), "null"
        )
    listed = "; ".join(f"{name} {example}" for name, example in FORMATS.items())
    return (
        f"{path}: example {number} ({shape}) is in no format this kit reads; one record per line, in one of: {listed}."
    )


def user_examples(fmt: str, records: Iterator[tuple[int, object]], path: Path) -> tuple[list[dict], Counter]:
    """The examples of a file in a user format (every record in `fmt`, else an error naming the record), and the
    counts: records read, and those dropped without an assistant reply."""
    counts = Counter(records=0, no_reply=0)
    examples = []
    for number, record in records:
        counts["records"] += 1
        if record_format(record) != fmt:
            raise DataError(f"{path}: example {number}: expected a {fmt} record like the first one, {FORMATS[fmt]}.")
        try:
            example = EXAMPLE_READERS[fmt](record)
        except ValueError as e:
            raise DataError(f"{path}: example {number}: {e}.") from None
        if example is None:
            counts["no_reply"] += 1
            continue
        # Without an id, the record's number (its line in a JSON-lines file) names it, and it is its own "tree" in
        # the held-out split.
        example_id = str(record["id"]) if isinstance(record, dict) and "id" in record else f"line-{number}"
        examples.append({**example, "id": example_id, "tree_id": example_id})
    return examples, counts


def text_of(content, number: int) -> str:
    """A message's text: a string, or OpenAI-style content parts of type text (joined by newlines, as vLLM's
    OpenAI-compatible server joins them)."""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise ValueError(f"message {number}: its content must be text or a list of text parts, got {short(content)}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a content part of type {kind!r}" if kind else f"the content part {short(part)}"
            raise ValueError(f"message {number} has {what}: this model reads text only; remove it, or the example")
        texts.append(part["text"])
    return "\n".join(texts).strip()


def turns(messages, key: str) -> list[dict]:
    """{"role", "content"} messages (or ShareGPT's {"from", "value"}) -> the kit's messages, text contents."""
    if not isinstance(messages, list):
        raise ValueError(f'"{key}" must be a list of messages, got {short(messages)}')
    out = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f'message {number} must be an object like {{"role": "user", "content": "..."}}')
        if message.get("tool_calls"):
            raise ValueError(f"message {number} holds tool calls: this model was trained on plain text turns only")
        role = message["role"] if "role" in message else message.get("from")
        if role not in ROLES:
            raise ValueError(
                f"message {number}: role {short(role)} is not supported (user and assistant turns, and a system "
                "message first; ShareGPT's human, gpt and system)"
            )
        content = message["content"] if "content" in message else message.get("value")
        out.append({"role": ROLES[role], "content": text_of(content, number)})
    return out


def check_turn_order(messages: list[dict]) -> None:
    """The template's order: an optional system message first, then user and assistant turns alternating from the
    user."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for index in range(start, len(messages)):
        role = messages[index]["role"]
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError(f"message {index + 1} is a system message: only the first message may be one")
        if role != expected:
            raise ValueError(f"message {index + 1} should be from the {expected} (turns must alternate)")


def conversation(messages: list[dict]) -> dict | None:
    """A whole conversation, its order checked; a trailing user turn has no reply to learn from and is cut. None
    when no assistant reply is left."""
    check_turn_order(messages)
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]
    return {"messages": messages} if any(m["role"] == "assistant" for m in messages) else None


def prompt_turns(prompt) -> list[dict]:
    """A prompt: a string (one user turn) or messages ending with a user turn."""
    messages = [{"role": "user", "content": prompt.strip()}] if isinstance(prompt, str) else turns(prompt, "prompt")
    check_turn_order(messages)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError('"prompt" must end with a user turn')
    return messages


def reply(value, key: str) -> list[dict]:
    """A completion, chosen or rejected reply: a string, or one assistant message."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value.strip()}]
    messages = turns(value, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f'"{key}" must be one assistant message (or a string)')
    return messages


def string_field(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be text, got {short(value)}')
    return value.strip()


def parse_text_line(line: str) -> list[dict]:
    """'### Human: hi ### Assistant: hello ### Human: ...' -> messages."""
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", line)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"expected text starting with '{HUMAN}'")
    return [
        {"role": "user" if marker == HUMAN else "assistant", "content": text.strip()}
        for marker, text in zip(parts[1::2], parts[2::2], strict=True)
    ]


def alpaca(record: dict) -> dict:
    """Alpaca's instruction, with its input (if any) after a blank line, as the user turn; its output, the reply."""
    parts = (string_field(record, "instruction"), string_field(record, "input", optional=True))
    request = "\n\n".join(part for part in parts if part)
    return {"messages": [{"role": "user", "content": request}, *reply(string_field(record, "output"), "output")]}


def prompt_completion(record: dict) -> dict:
    return {"messages": prompt_turns(record["prompt"]) + reply(record["completion"], "completion")}


def preference_pair(record: dict) -> dict:
    """TRL's preference format: an explicit prompt with one reply on each side, or (implicit prompt) two whole
    conversations that differ only in their last, assistant, message."""
    if "prompt" in record:
        return {
            "prompt": prompt_turns(record["prompt"]),
            "chosen": reply(record["chosen"], "chosen"),
            "rejected": reply(record["rejected"], "rejected"),
        }
    chosen, rejected = turns(record["chosen"], "chosen"), turns(record["rejected"], "rejected")
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise ValueError(
            'without a "prompt", "chosen" and "rejected" must be two conversations that differ only in their last, '
            "assistant, message"
        )
    return {
        "prompt": prompt_turns(chosen[:-1]),
        "chosen": reply(chosen[-1:], "chosen"),
        "rejected": reply(rejected[-1:], "rejected"),
    }


def text_conversation(record) -> dict | None:
    return conversation(parse_text_line(record if isinstance(record, str) else record["text"]))


EXAMPLE_READERS = {
    "preference pairs": preference_pair,
    "prompt-completion": prompt_completion,
    "messages": lambda record: conversation(turns(record["messages"], "messages")),
    "ShareGPT": lambda record: conversation(turns(record["conversations"], "conversations")),
    "Alpaca": alpaca,
    "text": text_conversation,
}
# What training puts the loss on, per format (data_utils.Conversations.loss_on): every assistant turn of a
# conversation; the completion alone, as TRL trains prompt-completion data; or the pairs.
LOSS_ON = {"preference pairs": "pairs", "prompt-completion": "last"}

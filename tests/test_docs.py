"""The docs stay true to the repo: links resolve, quick-start commands run, the README stays short, and no tracked file
speaks of anything but the project.

- Every relative link in README.md, BENCHMARKS.md, CONTRIBUTING.md, bench/README.md and docs/ (subfolders included)
  points at a tracked file or folder, and every `#anchor` at a heading of the target (GitHub's heading ids).
- Every command in the README's quick start is one the repo accepts: `make X` names a Makefile target, and
  `python X.py --flag ...` names a script whose `--help` lists each flag.
- README.md has at most 350 lines.
- No tracked text file (outside data/) refers to numbered work items, to the build machinery's tools or to paths on
  the machines that build the project. Upstream bug reports are linked by URL, which the search skips.
"""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 350

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...

# Flags a script reads before its argument parser, so that `--help` does not list them.
READ_BEFORE_THE_PARSER = {"train.py": {"--config"}}
# Commands of the quick start that are neither make targets nor the repo's scripts: the standard installers.
EXTERNAL_COMMANDS = {("pip", "install"), ("python", "-m")}

FORBIDDEN = {
    "a numbered work item": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "a numbered round of work": re.compile(r"\bround\s+\d+", re.IGNORECASE),
    "a numbered session of work": re.compile(
        r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|\d+(?:st|nd|rd|th))\s+session\b",
        re.IGNORECASE,
    ),
    "the build machinery's tools": re.compile(
        r"\bdevice(?:'s)?\s+(?:tool|call|README)|\bgive[_]back\b", re.IGNORECASE
    ),
    "a path on the build machines": re.compile(r"/work[/]"),
}
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


@functools.cache
def tracked_files() -> frozenset[str]:
    """The repository's tracked files (posix paths); without git (an unpacked archive), the files on disk."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
        return frozenset(name for name in listed.stdout.decode().split("\0") if name)
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "cache", "model", "artifacts", "__pycache__", ".whl"}
        return frozenset(
            path.relative_to(ROOT).as_posix()
            for path in ROOT.rglob("*")
            if path.is_file() and not skip & set(path.relative_to(ROOT).parts)
        )


@functools.cache
def tracked_folders() -> frozenset[str]:
    """Every folder that holds a tracked file, at any depth."""
    return frozenset(parent.as_posix() for name in tracked_files() for parent in Path(name).parents if parent.parts)


def documents() -> list[Path]:
    named = [ROOT / name for name in ("README.md", "BENCHMARKS.md", "CONTRIBUTING.md", "bench/README.md")]
    return [path for path in named if path.is_file()] + sorted((ROOT / "docs").rglob("*.md"))


def outside_fences(text: str) -> str:
    """The markdown with the lines of fenced code blocks blanked (line numbers stay)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            lines.append("")
        else:
            lines.append("" if in_fence else line)
    return "\n".join(lines)


def outside_code(text: str) -> str:
    """The markdown without code blocks and inline code spans (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), outside_fences(text))


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation other than - and _ dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading id of a markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for line in outside_fences(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(ids)


def link_targets(path: Path) -> list[tuple[int, str]]:
    text = outside_code(path.read_text(encoding="utf-8"))
    found = []
    for pattern in (LINK, REFERENCE_DEFINITION):
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return sorted(found)


def link_problem(document: Path, target: str) -> str | None:
    """Why a link of `document` does not resolve, or None."""
    if EXTERNAL.match(target):
        return None
    location, _, anchor = target.partition("#")
    if location:
        resolved = (document.parent / location).resolve()
        try:
            relative = resolved.relative_to(ROOT).as_posix()
        except ValueError:
            return f"{target}: outside the repository"
        if relative not in tracked_files() and relative not in tracked_folders():
            return f"{target}: {relative} is not a tracked file or folder"
    else:
        resolved = document
    if anchor and resolved.suffix == ".md" and resolved.is_file() and anchor not in anchors(resolved):
        return f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT).as_posix()}"
    return None


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_links_resolve(document):
    problems = [
        f"{document.relative_to(ROOT).as_posix()}:{line}: {problem}"
        for line, target in link_targets(document)
        if (problem := link_problem(document, target))
    ]
    assert not problems, "broken links:\n" + "\n".join(problems)


def quick_start_commands() -> list[tuple[str, list[str]]]:
    """(the command as written, its words) for every command line of the bash blocks in the README's quick start."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\s*$(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    if not section:
        return []
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\s*$(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True  # comments (#) are dropped, quotes honoured
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token in {";", "&&", "||", "&", "|"}:
                    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # FOO=bar python ...
                        words = words[1:]
                    if words:
                        commands.append((shlex.join(words), words))
                    words = []
                else:
                    words.append(token)
    return commands


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return frozenset(targets)


@functools.cache
def script_help(script: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, f"`python {script} --help` failed:\n{done.stderr[-2000:]}"
    return done.stdout


def command_problems(words: list[str]) -> list[str]:
    program = Path(words[0]).name
    if program == "make":
        targets = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
        return [f"no Makefile target {target!r}" for target in targets if target not in make_targets()]
    if words[0] in {".", "source"} and words[1:] and words[1].endswith("activate"):
        return []
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        if len(words) > 1 and words[1].endswith(".py"):
            script = words[1]
            if script not in tracked_files():
                return [f"{script} is not a tracked script"]
            flags = [word.split("=")[0] for word in words[2:] if word.startswith("--")]
            if not flags:
                return []  # nothing to check, and not every script answers --help without running
            listed = script_help(script)
            accepted = READ_BEFORE_THE_PARSER.get(script, set())
            return [
                f"{script} does not list {flag} in --help"
                for flag in flags
                if flag not in accepted and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", listed)
            ]
        if ("python", words[1] if len(words) > 1 else "") in EXTERNAL_COMMANDS:
            return []
    if (program, words[1] if len(words) > 1 else "") in EXTERNAL_COMMANDS:
        files = [words[i + 1] for i, word in enumerate(words[:-1]) if word in {"-r", "--requirement"}]
        return [f"{name} is not a tracked file" for name in files if name not in tracked_files()]
    return [f"{words[0]!r} is neither a make target, a script of the repo nor a standard installer"]


def test_quick_start_has_commands():
    commands = quick_start_commands()
    assert len(commands) >= 5, "the README's quick start (## Quick start) has no bash blocks of commands"
    assert any(words[0] == "make" for _, words in commands)


@pytest.mark.parametrize("command", quick_start_commands(), ids=lambda command: command[0][:60])
def test_quick_start_command_is_accepted(command):
    written, words = command
    problems = command_problems(words)
    assert not problems, f"README quick start: `{written}`: " + "; ".join(problems)


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move details to docs/"


def text_of(name: str) -> str | None:
    path = ROOT / name
    if not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_tracked_files_speak_only_of_the_project():
    hits = []
    for name in sorted(tracked_files()):
        if name.startswith("data/") or (text := text_of(name)) is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            line = URL.sub("", line)
            hits += [
                f"{name}:{number}: {what}: {line.strip()[:120]}" for what, rx in FORBIDDEN.items() if rx.search(line)
            ]
    assert not hits, "rewrite these lines (link upstream reports by URL instead):\n" + "\n".join(hits)

"""Command lines: argument parsers that answer --help at once, YAML configs checked key by key, one-line errors.

Every entry point parses with these, so a user's mistake always ends the same way: `error: ...` on stderr, exit 2.
"""

import argparse
import difflib
import enum
import logging
import sys
import types
import typing
import warnings
from dataclasses import fields
from typing import Literal, NoReturn, Union

import yaml

from config import ConfigError, GenerationArguments
from workarounds import hf_argument_parser_class

# Known harmless lines that runs printed, silenced by their exact text at the entry points (everything else shows):
# - bitsandbytes 0.50 on CPUs with AVX512-BF16 looks for an optional kernel package and logs that it is missing;
# - peft 0.21 and TRL 1.16 call transformers 5.24's old names for activation checkpointing, which warn on each call.
QUIET_LOG_MESSAGES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)
QUIET_WARNINGS = (
    r"`gradient_checkpointing_enable` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
    r"`gradient_checkpointing_kwargs` is deprecated",
)


def fail(message: str, code: int = 2) -> NoReturn:
    """A user's mistake: one clear line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


def quiet_known_noise() -> None:
    """Silence exactly the known harmless lines (QUIET_LOG_MESSAGES, QUIET_WARNINGS) at an entry point."""

    class DropKnownLines(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not any(quiet in message for quiet in QUIET_LOG_MESSAGES)

    for handler in logging.getLogger().handlers:
        handler.addFilter(DropKnownLines())
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def argument_parser(dataclass_types, description: str | None = None):
    """transformers' HfArgumentParser for these dataclasses, loaded without transformers' package (fast --help),
    showing each flag's default, and with one-line errors."""

    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Keeps the docstring's command examples as written, and shows each flag's default."""

    parser = hf_argument_parser_class()(dataclass_types, formatter_class=HelpFormatter, description=description)
    return one_line_errors(parser)


def use_model_decoding_defaults(parser, args: list[str] | None) -> dict:
    """Start the decoding flags from the adapter's generation_config.json (what its report measured); flags given on
    the command line still win. Returns those defaults ({} without an adapter or a file)."""
    known, _ = parser.parse_known_args(args)
    if getattr(known, "no_adapter", False):
        return {}
    defaults = GenerationArguments.model_defaults(known.adapter)
    parser.set_defaults(**defaults)
    return defaults


def one_line_errors(parser):
    """argparse prints the whole usage (hundreds of lines with SFTConfig) before a bad flag's error: one line."""

    def error(message: str) -> NoReturn:
        fail(f"{message} (see --help)")

    parser.error = error
    return parser


def check_yaml_config(path: str, dataclass_types: tuple) -> None:
    """What TrlParser does not check in a --config file: that it reads, that every key is a setting (with the
    closest name when not), and that every value has the setting's type (TrlParser passes YAML values through)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark and Windows line endings are fine
            config = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config file.") from None
    if not isinstance(config, dict):
        got = "is empty" if config is None else f"holds a {type(config).__name__}"
        raise ConfigError(f"{path} must be a YAML mapping of settings (key: value lines); it {got}.")
    settings = {}
    for cls in dataclass_types:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):  # an annotation that cannot be resolved: no type check for that class
            hints = {}
        settings.update({f.name: hints.get(f.name, typing.Any) for f in fields(cls) if f.init})
    for key, value in config.items():
        if key == "env":  # TrlParser's environment variables
            continue
        if key not in settings:
            close = difflib.get_close_matches(str(key), settings, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (python train.py --help lists the settings)"
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}.")
        if not value_fits(value, settings[key]):
            raise ConfigError(
                f"{path}: {key} must be {type_name(settings[key])}, got {value!r} ({type(value).__name__})."
            )


def value_fits(value, annotation) -> bool:
    """Whether a YAML value can become a setting of this type (argparse converts strings like "2e-4" to numbers)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(value_fits(value, option) for option in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0")
    if annotation in (int, float):
        if isinstance(value, bool):
            return False
        if isinstance(value, str):
            try:
                annotation(value)
            except ValueError:
                return False
            return True
        return isinstance(value, int) or (annotation is float and isinstance(value, float))
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {member.value for member in annotation} or isinstance(value, str)
    return True  # a type we do not know: the parser decides


def type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text (quote it)"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))

"""Talk to the fine-tuned model: base model + the LoRA adapter from model/.

    python inference.py "How do I make a good cup of tea?"             # one answer, streamed
    python inference.py "Explain QLoRA in two sentences." --adapter model/checkpoint-100 --temperature 0
    python inference.py "Hello" --no-adapter --base microsoft/phi-2     # the base model alone, for comparison
    python inference.py --chat                                          # a conversation (/reset, /exit, Ctrl-D)
    python inference.py --input prompts.jsonl --output answers.jsonl    # batch: one answer per line, in order
    python inference.py --merge-to phi2-oasst1                          # a standalone model, adapter merged in

The adapter is the final one in --adapter (default model/), else its latest checkpoint; the base is the one recorded
with the adapter unless --base says otherwise. Prompts are built with the tokenizer's chat template (the same
"### Human: ... ### Assistant:" text as in training) and a reply ends at the end-of-sequence token.

Batch input: one JSON object per line, {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]};
each output line is the input object with "reply" (and "stopped": false when the reply hit --max-new-tokens) added.

--merge-to writes the base in 16 bits with the adapter folded in, plus the tokenizer and the portable chat template:
plain `AutoModelForCausalLM.from_pretrained(DIR)` loads it, and `transformers serve DIR` serves it OpenAI-style.
A 4-bit base cannot hold the merged weights exactly, so the base is reloaded unquantized.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cli_utils import argument_parser, fail, quiet_known_noise, use_model_decoding_defaults
from config import ChatModelArguments, GenerationArguments, QuantizationArguments, UserError, require

# torch, transformers and this kit's modules that load them are imported inside the functions that use them, once the
# arguments are parsed: --help and a mistake in the flags answer at once.

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class InferenceArguments:
    chat: bool = field(
        default=False, metadata={"help": "A conversation in the terminal: /reset clears it, /exit or Ctrl-D quits."}
    )
    input: str | None = field(default=None, metadata={"help": "Batch mode: a JSONL file of prompts (needs --output)."})
    output: str | None = field(default=None, metadata={"help": "Batch mode: the JSONL file the answers go to."})
    batch_size: int = field(default=8, metadata={"help": "Batch mode: prompts generated together (left-padded)."})
    merge_to: str | None = field(
        default=None, metadata={"help": "Write a standalone model (base + merged adapter) to this folder."}
    )
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "dtype of the merged model; auto: the GPU's compute dtype (fp16 on a T4), bfloat16 on CPU."},
    )
    max_input_tokens: int | None = field(
        default=None, metadata={"help": "Longest prompt in tokens; default: the context minus --max-new-tokens."}
    )

    def __post_init__(self):
        require(self.batch_size >= 1, "--batch-size must be at least 1.")
        require(
            self.max_input_tokens is None or self.max_input_tokens >= 1,
            f"--max-input-tokens must be at least 1, got {self.max_input_tokens}.",
        )


def parse_args(args: list[str] | None):
    parser = argument_parser(
        (ChatModelArguments, InferenceArguments, GenerationArguments, QuantizationArguments), __doc__
    )
    parser.add_argument("prompt", nargs="?", help="What to ask the model (one-shot mode).")
    use_model_decoding_defaults(parser, args)
    try:
        model_args, inference_args, gen_args, quant_args, extra = parser.parse_args_into_dataclasses(args)
    except ValueError as e:
        fail(str(e))
    prompt = None if extra.prompt is None else extra.prompt.strip()
    modes = [
        name
        for name, on in (
            ("a prompt", extra.prompt is not None),
            ("--chat", inference_args.chat),
            ("--input", inference_args.input),
            ("--merge-to", inference_args.merge_to),
        )
        if on
    ]
    if not modes:
        fail('nothing to do: pass a prompt (python inference.py "Hello"), --chat, --input FILE or --merge-to DIR.')
    if len(modes) > 1:
        fail(f"choose one of {' / '.join(modes)}: they are different modes.")
    if extra.prompt is not None and not prompt:
        fail('the prompt is empty: pass some text, e.g. python inference.py "Hello".')
    if inference_args.input and not inference_args.output:
        fail("--input needs --output FILE for the answers.")
    if inference_args.output and not inference_args.input:
        fail("--output goes with --input FILE (batch mode).")
    if inference_args.merge_to and model_args.no_adapter:
        fail("--merge-to merges an adapter: drop --no-adapter.")
    return model_args, inference_args, gen_args, quant_args, prompt


def main(args: list[str] | None = None):
    model_args, inference_args, gen_args, quant_args, prompt = parse_args(args)
    if inference_args.merge_to:
        return merge(model_args, inference_args)
    if inference_args.input:
        prompts = read_prompts(Path(inference_args.input))
        if not Path(inference_args.output).resolve().parent.is_dir():
            fail(f"cannot write {inference_args.output}: its folder does not exist.")

    from adapter_utils import load_chat_model
    from generation_utils import generate_reply, prompt_length, reply_streamer
    from model_utils import context_length

    try:
        model, tokenizer = load_chat_model(
            None if model_args.no_adapter else model_args.adapter, model_args.base, quant_args
        )
    except UserError as e:
        fail(str(e))
    max_input = inference_args.max_input_tokens or context_length(model) - gen_args.max_new_tokens
    if max_input < 1:
        fail(
            f"--max-new-tokens {gen_args.max_new_tokens} leaves no room for a prompt in the model's "
            f"{context_length(model)}-token context."
        )

    if inference_args.chat:
        return chat(model, tokenizer, gen_args, max_input)
    if inference_args.input:
        return answer_file(
            model, tokenizer, gen_args, prompts, Path(inference_args.output), max_input, inference_args.batch_size
        )
    messages = [{"role": "user", "content": prompt}]
    length = prompt_length(tokenizer, messages)
    if length > max_input:
        fail(f"the prompt is {length} tokens; the limit is {max_input} (--max-input-tokens). Shorten it.")
    return generate_reply(model, tokenizer, messages, gen_args, streamer=reply_streamer(tokenizer))


def chat(model, tokenizer, gen_args: GenerationArguments, max_input: int) -> list[dict]:
    """Read messages from stdin until /exit or end of input; each reply streams to stdout. Returns the history."""
    from generation_utils import generate_reply, history_that_fits, prompt_length, reply_streamer

    try:
        import readline  # noqa: F401  (line editing and history for input() in a terminal; not on every platform)
    except ImportError:
        pass
    interactive = sys.stdin.isatty()
    notice(f"Chatting with {max_input}-token prompts at most. /reset clears the history; /exit or Ctrl-D quits.")
    history: list[dict] = []
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            break
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == "/reset":
            history = []
            notice("(history cleared)")
            continue
        messages, dropped = history_that_fits(tokenizer, [*history, {"role": "user", "content": text}], max_input)
        if dropped:
            notice(f"(the conversation outgrew the context: dropped the oldest {dropped} exchange(s))")
        length = prompt_length(tokenizer, messages)
        if length > max_input:
            notice(f"(that message is {length} tokens; the limit is {max_input}: shorten it)")
            continue
        try:
            reply = generate_reply(model, tokenizer, messages, gen_args, streamer=reply_streamer(tokenizer))
        except KeyboardInterrupt:  # Ctrl-C stops a reply without ending the session; the cut reply is not kept
            notice("\n(stopped)")
            continue
        history = [*messages, {"role": "assistant", "content": reply}]
    return history


def notice(text: str) -> None:
    """Session messages go to stderr, so stdout holds only the model's replies."""
    print(text, file=sys.stderr, flush=True)


def read_prompts(path: Path) -> list[dict]:
    """The batch input: one JSON object per line with "prompt" or "messages"; blank lines are skipped. A UTF-8
    byte-order mark and Windows line endings are fine."""
    if not path.is_file():
        fail(f"{path} not found.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and try again.")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or nesting or a number beyond Python's limits
            fail(f"{path} line {number} is not JSON: {getattr(e, 'msg', None) or type(e).__name__}.")
        if not isinstance(row, dict) or not (
            isinstance(row.get("prompt"), str) or is_conversation(row.get("messages"))
        ):
            fail(
                f'{path} line {number}: expected {{"prompt": "..."}} or {{"messages": [...]}} ending with a user turn.'
            )
        rows.append(row)
    if not rows:
        fail(f"{path} holds no prompts.")
    return rows


def is_conversation(messages) -> bool:
    """Messages the template can render as a prompt: text turns alternating from the user, ending with the user."""
    return (
        isinstance(messages, list)
        and len(messages) % 2 == 1
        and all(
            isinstance(m, dict)
            and m.get("role") == ("user" if i % 2 == 0 else "assistant")
            and isinstance(m.get("content"), str)
            for i, m in enumerate(messages)
        )
    )


def answer_file(model, tokenizer, gen_args, rows: list[dict], output: Path, max_input: int, batch_size: int):
    from generation_utils import generate_replies, prompt_length

    conversations = [row.get("messages") or [{"role": "user", "content": row["prompt"]}] for row in rows]
    for number, messages in enumerate(conversations, 1):
        length = prompt_length(tokenizer, messages)
        if length > max_input:
            fail(
                f"prompt {number} is {length} tokens; the limit is {max_input} (--max-input-tokens). "
                "Nothing was generated."
            )
    results = generate_replies(model, tokenizer, conversations, gen_args, batch_size)
    with output.open("w", encoding="utf-8") as out:
        for row, result in zip(rows, results, strict=True):
            out.write(json.dumps({**row, **result}, ensure_ascii=False) + "\n")
    notice(f"wrote {len(results)} answers to {output}")
    return results


def merge(model_args: ChatModelArguments, inference_args: InferenceArguments) -> Path:
    out = Path(inference_args.merge_to)
    if out.exists() and any(out.iterdir()):
        fail(f"{out} already exists and is not empty: choose a new folder for the merged model.")
    from adapter_utils import merge_adapter
    from quantization_utils import dtype_name, merge_dtype, this_device

    dtype = inference_args.merge_dtype
    if dtype == "auto":
        dtype = dtype_name(merge_dtype(*this_device()))
    try:
        merged = merge_adapter(model_args.adapter, out, model_args.base, dtype)
    except UserError as e:
        fail(str(e))
    notice(f"wrote the merged model ({dtype}) and its tokenizer to {merged}")
    return merged


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    quiet_known_noise()
    main()

"""Generation, written once for inference.py, app.py and the report: prompts built with the tokenizer's chat template,
history trimmed to the context, one reply (optionally streamed), batched replies with left padding, and the decoding
settings an adapter starts from (its generation_config.json, which the report writes).
"""

import queue
import threading

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from config import GenerationArguments, ReportArguments


def reply_streamer(tokenizer, **kwargs):
    """A TextStreamer that prints only the reply, without the space the template puts after '### Assistant:'."""

    class ReplyStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> torch.Tensor:
    """The conversation so far, ending with '### Assistant:', as the model saw it in training."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def row_repetition_penalty(penalties: list[float], device) -> RepetitionPenaltyLogitsProcessor:
    """transformers' repetition penalty with a value for each row, so that replies decoded with and without a penalty
    share one batch (one generate call of 2N rows is faster than two of N). The arithmetic is
    transformers' own: its 2-D path broadcasts a column of penalties like a single one."""
    processor = RepetitionPenaltyLogitsProcessor(1.0)
    processor.penalty = torch.tensor(penalties, dtype=torch.float32, device=device)[:, None]
    return processor


def documented_decoding(tokenizer, report_args: ReportArguments) -> GenerationConfig:
    """The decoding settings a report measured its clean stops with, as the adapter's own GenerationConfig (greedy,
    the report's repetition penalty and budget), which inference.py, app.py and the merged model start from."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=report_args.report_max_new_tokens,
        repetition_penalty=report_args.report_repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class Reply(str):
    """A reply's text, with `ended`: it ended with EOS (not at the token budget or a stop)."""

    ended: bool = False


@torch.inference_mode()
def generate_reply(
    model, tokenizer, messages: list[dict], gen_args: GenerationArguments, streamer=None, stopping_criteria=None
) -> Reply:
    """The assistant's next reply: generation stops at EOS, and the reply is cut from the output by token position."""
    if gen_args.seed is not None:
        torch.manual_seed(gen_args.seed)
    inputs = prompt_ids(tokenizer, messages).to(model.device)
    output = model.generate(
        **inputs,
        **gen_args.generate_kwargs(),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        stopping_criteria=stopping_criteria,
    )
    new = output[0][inputs["input_ids"].shape[1] :]
    reply = Reply(tokenizer.decode(new, skip_special_tokens=True).strip())
    reply.ended = bool(len(new)) and new[-1].item() == tokenizer.eos_token_id
    return reply


@torch.inference_mode()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    gen_args: GenerationArguments,
    batch_size: int = 8,
    adapter_names: list[str] | None = None,
    stop_strings: list[str] | None = None,
    count_tokens: bool = False,
    repetition_penalties: list[float] | None = None,
) -> list[dict]:
    """The next reply to each conversation, in order, generated in batches with left padding (so that every row's
    new tokens start at the same position): [{"reply": text, "stopped": ended with EOS within the budget}].
    `adapter_names` (PEFT models): the adapter for each conversation's row, "__base__" for none. `stop_strings`: a row
    also ends where one of these appears (it stays in the reply, and the row does not count as stopped).
    `count_tokens`: also "new_tokens", the reply's length in generated tokens (an EOS that ended it included).
    `repetition_penalties`: each conversation's own penalty, in place of gen_args' one."""
    if gen_args.seed is not None:
        torch.manual_seed(gen_args.seed)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies: list[list[int]] = []
    progress = tqdm(total=len(conversations), desc="Generating", unit="reply", disable=len(conversations) <= 1)
    try:
        for start in range(0, len(conversations), batch_size):
            batch = tokenizer.apply_chat_template(
                conversations[start : start + batch_size],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            per_row = {"adapter_names": adapter_names, "repetition_penalties": repetition_penalties}
            per_row = {name: values[start : start + batch_size] for name, values in per_row.items() if values}
            replies += decode_batch(model, tokenizer, batch, gen_args, per_row, stop_strings, progress)
    finally:
        tokenizer.padding_side = padding_side
        progress.close()
    results = []
    for reply_ids in replies:
        # A row that ended at a stop string was padded after it, with EOS where that is the pad token.
        ended = bool(reply_ids) and reply_ids[-1] == tokenizer.eos_token_id
        reply_ids = reply_ids[:-1] if ended else reply_ids
        reply = tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        stopped = ended and not any(stop in reply for stop in stop_strings or ())
        results.append({"reply": reply, "stopped": stopped})
        if count_tokens:
            results[-1]["new_tokens"] = len(reply_ids) + stopped
    return results


# Rows generated between two checks for finished ones: a finished row is computed for at most this many more tokens
# (as padding), and each check costs one generate() call's set-up.
DECODE_CHUNK_TOKENS = 16


def decode_batch(model, tokenizer, batch, gen_args: GenerationArguments, per_row: dict, stop_strings, progress):
    """Each row's new token ids, up to and including the EOS that ended it. transformers' generate() runs every row of
    a batch until the last one ends; here it runs DECODE_CHUNK_TOKENS tokens at a time, and a row that ended (EOS, a
    stop string) leaves the batch and its KV cache between two runs, so that a long reply does not keep the short
    ones' rows computing. Each run continues from the KV cache of the last, with the whole text so far (a repetition
    penalty sees all of it), so the tokens are those of one generate() call."""
    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    rows = list(range(len(input_ids)))  # the batch rows still generating, as indices into `new`
    new: list[list[int]] = [[] for _ in rows]
    cache = None
    while rows and len(new[rows[0]]) < gen_args.max_new_tokens:
        kwargs = gen_args.generate_kwargs() | {
            "max_new_tokens": min(DECODE_CHUNK_TOKENS, gen_args.max_new_tokens - len(new[rows[0]]))
        }
        if "adapter_names" in per_row:
            kwargs["adapter_names"] = [per_row["adapter_names"][i] for i in rows]
        if "repetition_penalties" in per_row:
            penalties = row_repetition_penalty([per_row["repetition_penalties"][i] for i in rows], model.device)
            kwargs |= {"repetition_penalty": 1.0, "logits_processor": LogitsProcessorList([penalties])}
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            cache=cache,
            **kwargs,
            **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
        )
        fresh = output.sequences[:, input_ids.shape[1] :]
        going = []
        for position, (row, tokens) in enumerate(zip(rows, fresh.tolist(), strict=True)):
            if tokenizer.eos_token_id in tokens:  # the row ended; what follows its EOS is padding
                new[row] += tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            elif stop_strings and any(stop in tokenizer.decode(new[row] + tokens) for stop in stop_strings):
                while tokens and tokens[-1] == tokenizer.pad_token_id:  # the padding after the stop string
                    tokens.pop()
                new[row] += tokens
            else:
                new[row] += tokens
                going.append(position)
        progress.update(len(rows) - len(going))
        progress.set_postfix(tokens=sum(map(len, new)), refresh=False)
        keep = torch.tensor(going, dtype=torch.long, device=fresh.device)
        rows = [rows[i] for i in going]
        input_ids = output.sequences[keep]
        attention = torch.cat([attention, torch.ones_like(fresh)], dim=1)[keep]
        cache = output.cache
        if len(going) < len(fresh):
            cache.batch_select_indices(keep)
    progress.update(len(rows))
    return new


class StopOnEvent:
    """A stopping criterion that ends generation when `event` is set (the page's stop button, a closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, messages: list[dict], gen_args: GenerationArguments, timeout: float = 120.0):
    """Yield the reply as it grows (the whole text so far each time), generating in a background thread; return
    whether it ended with EOS (`ended = yield from stream_reply(...)`).

    The streamer waits at most `timeout` seconds for each piece, so a generation that dies or stalls raises instead
    of hanging its caller; an error in the generation thread is raised here. Closing this generator (a page's stop
    button) stops the generation at the next token, so the model is free again at once."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    stop = threading.Event()
    failure: list[BaseException] = []
    final: list[Reply] = []

    def generate():
        try:
            stopping = StoppingCriteriaList([StopOnEvent(stop)])
            final.append(generate_reply(model, tokenizer, messages, gen_args, streamer, stopping))
        except BaseException as e:  # handed to the consumer, which re-raises it
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = shown = ""
    try:
        for piece in streamer:
            text += piece
            if text.strip() != shown:
                shown = text.strip()
                yield shown
    except queue.Empty:
        raise TimeoutError(f"generation produced nothing for {timeout:.0f} s; it was stopped.") from None
    finally:
        stop.set()
        # The model is not free until the thread is done with it (the caller may switch the adapter next).
        thread.join(timeout)
    if failure:
        raise failure[0]
    # The streamer decodes piece by piece and can differ in whitespace (it restarts after a newline); the last
    # update is the reply decoded whole, as generate_reply returns it.
    if final and final[0] != shown:
        yield final[0]
    return bool(final) and final[0].ended


def history_that_fits(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (a user turn and its reply) until the prompt fits in `max_tokens`.

    Returns the kept messages and how many exchanges were dropped. The newest user message is always kept: when it
    alone is too long, the caller must refuse it (see `prompt_length`)."""
    dropped = 0
    while len(messages) > 1 and prompt_length(tokenizer, messages) > max_tokens:
        messages = messages[2:] if messages[0]["role"] == "user" and len(messages) > 2 else messages[1:]
        dropped += 1
    return messages, dropped


def prompt_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

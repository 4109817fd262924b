"""Generation, written once for inference.py, app.py and the report: prompts built with the tokenizer's chat template,
history trimmed to the context, one reply (optionally streamed), and batched replies with left padding.
"""

import queue
import threading

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, RepetitionPenaltyLogitsProcessor

from config import GenerationArguments


def reply_streamer(tokenizer, **kwargs):
    """A TextStreamer that prints only the reply, without the space the template puts after '### Assistant:'."""
    from transformers import TextStreamer

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
    share one batch (on CPU one generate call of 2N rows is about a quarter faster than two of N). The arithmetic is
    transformers' own: its 2-D path broadcasts a column of penalties like a single one."""
    processor = RepetitionPenaltyLogitsProcessor(1.0)
    processor.penalty = torch.tensor(penalties, dtype=torch.float32, device=device)[:, None]
    return processor


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
    results = []
    try:
        for start in tqdm(
            range(0, len(conversations), batch_size), desc="Generating", unit="batch", disable=len(conversations) <= 1
        ):
            batch = tokenizer.apply_chat_template(
                conversations[start : start + batch_size],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            per_row = {} if adapter_names is None else {"adapter_names": adapter_names[start : start + batch_size]}
            if repetition_penalties is not None:
                penalties = row_repetition_penalty(repetition_penalties[start : start + batch_size], model.device)
                per_row |= {"repetition_penalty": 1.0, "logits_processor": LogitsProcessorList([penalties])}
            output = model.generate(
                **batch,
                **(gen_args.generate_kwargs() | per_row),
                **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                # Rows that stop early are padded after their EOS: the reply is everything before the first EOS.
                ended = tokenizer.eos_token_id in row
                reply_ids = row[: row.index(tokenizer.eos_token_id)] if ended else row
                reply = tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
                stopped = ended and not any(stop in reply for stop in stop_strings or ())
                results.append({"reply": reply, "stopped": stopped})
                if count_tokens:
                    results[-1]["new_tokens"] = len(reply_ids) + stopped
    finally:
        tokenizer.padding_side = padding_side
    return results


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
    from transformers import StoppingCriteriaList, TextIteratorStreamer

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

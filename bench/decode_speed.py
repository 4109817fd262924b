"""Decoding speed on CPU: a trained run's 4-bit model with its adapter, this project's paths against a plain
transformers + peft generate() on the same model, in one run.

    python bench/decode_speed.py                                  # after `make demo`: model/ (SmolLM2-135M)
    python bench/decode_speed.py --prompts 5 --max_new_tokens 128 # a shorter batched part
    python bench/decode_speed.py --profile 32                     # also: where a decode step's time goes

Single stream: one greedy reply of up to --tokens tokens to the report's first held-out question, through
- plain: AutoModelForCausalLM with the 4-bit config, PeftModel, generate() (as the model card shows);
- ours: inference.py's path (`adapter_utils.load_chat_model`, `generation_utils.generate_reply`).
On a CPU with AVX512-BF16, where bitsandbytes has a fused bf16 kernel (which ours keeps), a second pair shows what
every other CPU runs: plain without the fused kernel (bitsandbytes dequantizes at every forward), and ours with the
weights dequantized once.
Batched: the report's clean-stop rows (each question x base and tuned x the run's repetition penalty and plain
greedy), up to --max_new_tokens each:
- plain: one generate() call with each row's adapter and penalty, as the report ran before;
- ours: `scoring.clean_stop_replies` (the report's path).
The batched figure is row-tokens/s: the tokens of every reply up to its end, over the seconds of the whole call.
Replies are compared token for token; --loss also scores the held-out loss both ways.
Prints a table and writes JSON (--json).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bitsandbytes.functional import has_avx512bf16  # whether bitsandbytes has its fused bf16 CPU kernel
from peft import PeftModel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import write_json  # noqa: E402

from adapter_utils import load_chat_model  # noqa: E402
from chat_template import HUMAN  # noqa: E402
from checkpoint_utils import read_run_config  # noqa: E402
from config import DataArguments, GenerationArguments, QuantizationArguments  # noqa: E402
from data_utils import load_train_and_eval  # noqa: E402
from generation_utils import generate_reply, row_repetition_penalty  # noqa: E402
from model_utils import load_tokenizer  # noqa: E402
from report import settings  # noqa: E402
from scoring import assistant_token_loss, clean_stop_replies  # noqa: E402
from workarounds import keep_4bit_weights_trainable_on_cpu  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="model", help="A finished training run (adapter, eval.json).")
    parser.add_argument("--tokens", type=int, default=128, help="Single stream: the longest reply, in tokens.")
    parser.add_argument("--prompts", type=int, default=20, help="Batched: held-out questions (0: skip batched).")
    parser.add_argument("--max_new_tokens", type=int, default=0, help="Batched: the longest reply (0: the run's).")
    parser.add_argument("--profile", type=int, default=0, help="Also profile this many single-stream tokens.")
    parser.add_argument("--loss", action="store_true", help="Also the held-out loss, plain and ours.")
    parser.add_argument("--json", default="bench/results/decode_speed.json", help="Where the figures go ('': none).")
    return parser.parse_args(argv)


def load_plain(folder: Path, run: dict, repack: bool = True):
    """The 4-bit base with the adapter as transformers and peft load it by themselves, in the dtype the project
    computes in on CPU (float32)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=run["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=run["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        run["model_name_or_path"], quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    if not repack:
        keep_4bit_weights_trainable_on_cpu(base)
    model = PeftModel.from_pretrained(base, folder).eval()
    return model, load_tokenizer(str(folder))  # the saved tokenizer, with the training template (for the loss)


def load_ours(folder: Path, dequantize: str = "auto"):
    return load_chat_model(folder, quant_args=QuantizationArguments(dequantize_on_cpu=dequantize))


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


@torch.inference_mode()
def plain_reply(model, tokenizer, messages: list[dict], tokens: int) -> list[int]:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def ours_reply(model, tokenizer, messages: list[dict], tokens: int) -> list[int]:
    reply = generate_reply(model, tokenizer, messages, GenerationArguments(max_new_tokens=tokens, temperature=0))
    return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * reply.ended


def single_stream(name: str, model, tokenizer, messages: list[dict], tokens: int, reply) -> dict:
    reply(model, tokenizer, [{"role": "user", "content": "Hi"}], 4)  # warm-up (and bitsandbytes' repack)
    ids, seconds = timed(reply, model, tokenizer, messages, tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    print(f"single stream, {name}: {len(ids)} tokens in {seconds:.2f} s = {len(ids) / seconds:.2f} tokens/s")
    return {"tokens": len(ids), "seconds": seconds, "tokens_per_second": len(ids) / seconds, "reply": text}


def report_rows(prompts: list, penalty: float) -> tuple[list, list[str], list[float]]:
    """The rows of the report's clean-stop call: every question for each decoding, then side (scoring.clean_stops)."""
    decodings = [penalty, 1.0] if penalty != 1.0 else [penalty]
    rows = [(p, side, d) for d in decodings for side in ("__base__", "default") for p in prompts]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@torch.inference_mode()
def plain_batched(model, tokenizer, prompts, adapters, penalties, max_new_tokens) -> list[dict]:
    """One generate() call over every row, with each row's adapter and penalty: rows run until the last one ends."""
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        adapter_names=adapters,
        repetition_penalty=1.0,
        logits_processor=LogitsProcessorList([row_repetition_penalty(penalties, model.device)]),
        stop_strings=[HUMAN],
        tokenizer=tokenizer,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    replies = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        ended = tokenizer.eos_token_id in row
        ids = row[: row.index(tokenizer.eos_token_id)] if ended else row
        reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
        replies.append({"reply": reply, "new_tokens": len(ids) + (ended and HUMAN not in reply)})
    return replies


def batched(name: str, replies: list[dict], seconds: float) -> dict:
    tokens = sum(r["new_tokens"] for r in replies)
    print(
        f"batched, {name}: {len(replies)} rows, {tokens} tokens in {seconds:.1f} s "
        f"= {tokens / seconds:.2f} row-tokens/s"
    )
    return {"rows": len(replies), "tokens": tokens, "seconds": seconds, "row_tokens_per_second": tokens / seconds}


def profile_decode(model, tokenizer, messages, tokens: int, reply) -> str:
    """The torch profiler's table of `tokens` decode steps (the prompt's forward included), by own CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        reply(model, tokenizer, messages, tokens)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def held_out_loss(model, tokenizer, run: dict) -> tuple[float, int]:
    _, dev, test = load_train_and_eval(settings(DataArguments, run))
    return assistant_token_loss(model, tokenizer, test or dev, run["max_length"])


# Each of our paths, and the plain path that computes the same arithmetic (so that their replies can be identical).
# On a CPU with AVX512-BF16, bitsandbytes runs a fused bf16 kernel and "ours" keeps it (auto); the second pair is what
# every other CPU runs: bitsandbytes dequantizing at every forward, against ours with the weights dequantized once.
PAIRS = {"ours": "plain", "ours, dequantized once": "plain, no fused kernel"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = Path(args.model_dir)
    run = read_run_config(folder)
    questions = json.loads((folder / "eval.json").read_text())["prompts"]
    messages = [{"role": "user", "content": questions[0]}]
    paths = {"plain": lambda: load_plain(folder, run), "ours": lambda: load_ours(folder)}
    if has_avx512bf16():
        paths["plain, no fused kernel"] = lambda: load_plain(folder, run, repack=False)
        paths["ours, dequantized once"] = lambda: load_ours(folder, dequantize="yes")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "avx512_bf16": has_avx512bf16(),
        "question": questions[0],
        "single_stream": {},
        "profiles": {},
        "batched": {},
        "loss": {},
    }
    penalty = run.get("report_repetition_penalty", 1.0)
    max_new_tokens = args.max_new_tokens or run.get("report_max_new_tokens", 512)
    prompts, adapters, penalties = report_rows(
        [[{"role": "user", "content": q}] for q in questions[: args.prompts]], penalty
    )
    replies = {}
    for name, load in paths.items():
        model, tokenizer = load()
        ours = name in PAIRS
        result["single_stream"][name] = single_stream(
            name, model, tokenizer, messages, args.tokens, ours_reply if ours else plain_reply
        )
        if args.profile:
            result["profiles"][name] = profile_decode(
                model, tokenizer, messages, args.profile, ours_reply if ours else plain_reply
            )
            print(f"profile, {name} ({args.profile} tokens):\n{result['profiles'][name]}")
        if args.loss:
            (loss, count), seconds = timed(held_out_loss, model, tokenizer, run)
            result["loss"][name] = {"heldout_loss": loss, "tokens": count, "seconds": seconds}
            print(f"held-out loss, {name}: {loss:.6f} on {count} tokens ({seconds:.1f} s)")
        if prompts:
            if ours:
                rows, seconds = timed(
                    clean_stop_replies, model, tokenizer, prompts, max_new_tokens, adapter_names=adapters,
                    repetition_penalties=penalties,
                )  # fmt: skip
            else:
                rows, seconds = timed(plain_batched, model, tokenizer, prompts, adapters, penalties, max_new_tokens)
            replies[name] = [r["reply"] for r in rows]
            result["batched"][name] = batched(name, rows, seconds)
        del model

    for ours, plain in PAIRS.items():
        if ours not in paths:
            continue
        single, plain_single = result["single_stream"][ours], result["single_stream"][plain]
        single["x_" + plain] = single["tokens_per_second"] / plain_single["tokens_per_second"]
        single["same_reply_as_" + plain] = single["reply"] == plain_single["reply"]
        if replies:
            figures = result["batched"][ours]
            figures["x_" + plain] = result["batched"][plain]["seconds"] / figures["seconds"]
            figures["same_replies_as_" + plain] = sum(
                a == b for a, b in zip(replies[ours], replies[plain], strict=True)
            )
            result["batched_replies"] = replies
    print_summary(result, max_new_tokens)
    write_json(args.json, result)
    return result


def print_summary(result: dict, max_new_tokens: int) -> None:
    print(f"\n{result['machine']}, AVX512-BF16: {result['avx512_bf16']}")
    for ours, plain in PAIRS.items():
        if ours not in result["single_stream"]:
            continue
        single = result["single_stream"]
        print(f"single stream, {ours} against {plain}:")
        print(
            f"  {single[plain]['tokens_per_second']:.2f} -> {single[ours]['tokens_per_second']:.2f} tokens/s, "
            f"x{single[ours]['x_' + plain]:.2f}, same reply: {single[ours]['same_reply_as_' + plain]}"
        )
        if result["batched"]:
            batch, plain_batch = result["batched"][ours], result["batched"][plain]
            print(f"batched ({batch['rows']} rows, up to {max_new_tokens} tokens), {ours} against {plain}:")
            print(
                f"  {plain_batch['seconds']:.1f} s -> {batch['seconds']:.1f} s, x{batch['x_' + plain]:.2f}; "
                f"{batch['row_tokens_per_second']:.1f} row-tokens/s; "
                f"identical replies: {batch['same_replies_as_' + plain]} of {batch['rows']}"
            )
    for name, figures in result["loss"].items():
        print(f"held-out loss, {name}: {figures['heldout_loss']:.6f} ({figures['tokens']} tokens)")


if __name__ == "__main__":
    main()

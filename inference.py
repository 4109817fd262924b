"""Answer a prompt with the fine-tuned model: base model + the LoRA adapter from model/.

    python inference.py "How do I make a good cup of tea?"
    python inference.py "Explain QLoRA in two sentences." --adapter model/checkpoint-100 --temperature 0
    python inference.py "Hello" --no_adapter --base microsoft/phi-2      # the base model alone, for comparison

The prompt is built with the tokenizer's chat template (the same "### Human: ... ### Assistant:" text as in
training); the reply streams to the terminal and generation stops at the end-of-sequence token.
"""

import logging
import sys
from dataclasses import dataclass, field

from config import GenerationArguments, QuantizationArguments, fail


@dataclass
class InferenceArguments:
    adapter: str = field(
        default="model", metadata={"help": "LoRA adapter folder (its final adapter, else its latest checkpoint)."}
    )
    base: str | None = field(
        default=None, metadata={"help": "Base model (Hub id or folder). Default: the base recorded with the adapter."}
    )
    no_adapter: bool = field(default=False, metadata={"help": "Answer with the base model alone (needs --base)."})


def main(args: list[str] | None = None) -> str:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((InferenceArguments, GenerationArguments, QuantizationArguments))
    parser.description = __doc__
    parser.add_argument("prompt", help="What to ask the model.")
    try:
        inference_args, gen_args, quant_args, extra = parser.parse_args_into_dataclasses(args)
    except ValueError as e:
        fail(str(e))
    prompt = extra.prompt.strip()
    if not prompt:
        fail('the prompt is empty: pass some text, e.g. python inference.py "Hello".')

    from model_utils import ModelError, generate_reply, load_chat_model, reply_streamer

    try:
        model, tokenizer = load_chat_model(
            None if inference_args.no_adapter else inference_args.adapter, inference_args.base, quant_args
        )
    except ModelError as e:
        fail(str(e))
    messages = [{"role": "user", "content": prompt}]
    return generate_reply(model, tokenizer, messages, gen_args, streamer=reply_streamer(tokenizer))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    main()

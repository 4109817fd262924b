"""Build a tiny random model with Phi-2's architecture, and a tokenizer, for tests and CPU smoke runs.

    python tiny_model.py --out cache/tiny-phi
    python train.py --config configs/tiny_cpu.yaml

The model is `PhiForCausalLM` (the class Phi-2 loads as) with a few small layers and random weights, saved like any
Hub checkpoint, so it goes through the same `from_pretrained` path (4-bit nf4 included) as microsoft/phi-2. The
tokenizer is a byte-level BPE like Phi-2's (GPT-2 style, `<|endoftext|>` as EOS and no pad token), trained in a second
on the bundled oasst1 sample so that its tokens look like real text.
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from chat_template import ASSISTANT, HUMAN
from data_utils import SAMPLE

EOS = "<|endoftext|>"


def sample_texts(path: Path = SAMPLE):
    for line in path.read_text(encoding="utf-8").splitlines():
        stack = [json.loads(line)["prompt"]]
        while stack:
            message = stack.pop()
            yield message["text"]
            stack.extend(message.get("replies", []))
    yield f"{HUMAN} {ASSISTANT}"


def build_tokenizer(vocab_size: int = 1024):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(sample_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def build_tiny_phi(out_dir: str | Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-weight PhiForCausalLM and its tokenizer to out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=1024,
        partial_rotary_factor=0.5,  # Phi-2 uses 0.4 of head_dim 80; 0.5 of 16 keeps the rotary dims even
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,  # as in Phi-2
    )
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cache/tiny-phi", help="Folder to write the model and tokenizer to.")
    print(build_tiny_phi(parser.parse_args().out))

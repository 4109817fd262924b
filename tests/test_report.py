"""The before/after report (report.py) on tiny runs: the files a run leaves, reruns with other report settings, the
held-out part it scores, what quantization costs, and training's memory let go before the report loads its own."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import report as script
import train
import trainer_setup
from config import DataArguments
from data_utils import load_train_and_eval

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
    # report counts what training trained on (training_examples.prepare_examples).
    assert report["data"]["heldout_examples"] == 10 and report["data"]["train_examples"] == 87
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"{report['base']['heldout_loss']:.4f}" in card and f"{report['tuned']['heldout_loss']:.4f}" in card
    assert f"{report['loss_ratio']:.3f}" in card and "![training and held-out loss](loss.png)" in card
    assert "87 for training, 10 held out" in card
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs


@pytest.mark.slow
def test_as_a_command_a_mistake_is_one_line_and_no_library_speaks_first(tmp_path):
    """report.py imports what loads bitsandbytes (whose import logs a known line) only once it has set up the logging
    that filters that line: a mistake costs one line on stderr, and nothing comes before it."""
    folder = tmp_path / "no-run"
    result = subprocess.run(
        [sys.executable, "report.py", "--model_dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {folder / 'run_config.yaml'} not found: point --model_dir at a training output folder."
    ]


@pytest.mark.slow
def test_report_reruns_with_other_report_settings_only(tiny_cpu_run, tmp_path, capsys):
    _, out, _ = tiny_cpu_run
    copy = shutil.copytree(out, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    report = script.main(["--model_dir", str(copy), "--report_prompts", "2", "--report_repetition_penalty", "1.2"])
    assert len(report["prompts"]) == 2 and len(report["tuned"]["replies"]) == 2
    assert "repetition penalty\n1.2)" in (copy / "README.md").read_text()

    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model_dir", str(copy), "--max_steps", "3"])
    assert exit_info.value.code == 2
    assert "--max_steps: report.py takes --model_dir and the report settings" in capsys.readouterr().err


@pytest.fixture(scope="module")
def short_context_run(tiny_phi, tmp_path_factory, sample_path):
    """One step with --max_length 40 on a copy of the tiny base that carries a model card, as demo_model.py writes
    for SmolLM2: at 40 tokens most conversations are cut, and some prompts leave nothing to train."""
    from huggingface_hub import ModelCard, ModelCardData

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


@pytest.mark.slow
def test_the_report_scores_the_test_part_and_on_request_exactly_the_dev_part_training_evaluated_on(
    short_context_run, tmp_path
):
    trained_on = json.loads((short_context_run / "train_results.json").read_text())["heldout_ids"]
    test = json.loads((short_context_run / "eval.json").read_text())
    assert test["heldout_part"] == "test" and test["data"]["heldout_trees"] == 10
    assert not set(test["heldout_ids"]) & set(trained_on)  # the test part was never evaluated on in training

    copy = shutil.copytree(short_context_run, tmp_path / "model")
    dev = script.main(["--model_dir", str(copy), "--report_on", "dev", "--report_prompts", "1"])
    assert dev["heldout_ids"] == trained_on and dev["heldout_part"] == "dev"
    # Every held-out tree is scored, although most of these conversations are longer than --max_length 40.
    assert len(trained_on) == json.loads((copy / "eval.json").read_text())["data"]["heldout_trees"] == 20


@pytest.mark.slow
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


@pytest.mark.slow
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
    root = Path(__file__).resolve().parents[1]
    code = "import importlib.util; spec = importlib.util.find_spec('evaluate'); print(spec and spec.origin)"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    origin = result.stdout.strip()
    assert result.returncode == 0 and (origin == "None" or not origin.startswith(str(root))), origin


@pytest.mark.slow
def test_training_lets_go_of_its_model_and_optimizer_before_the_report_loads_its_own(tiny_phi, tmp_path, monkeypatch):
    import gc
    import weakref

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

    build_trainer.real, load_chat_model.real = trainer_setup.build_trainer, script.load_chat_model
    monkeypatch.setattr(trainer_setup, "build_trainer", build_trainer)
    monkeypatch.setattr(script, "load_chat_model", load_chat_model)
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--eval_dataset", str(data), "--max_steps", "1"]
    args += ["--lora_r", "4", "--report_to", "none", "--report_prompts", "2", "--report_max_new_tokens", "4"]
    trainer, _ = train.main([*args, "--output_dir", str(tmp_path / "model"), "--save_steps", "1000"])
    assert training["alive when the report loads"] == []
    assert (tmp_path / "model" / "eval.json").is_file() and trainer.state.global_step == 1


@pytest.mark.slow
def test_every_run_reports_preference_accuracy_on_the_held_out_pairs(tiny_cpu_run, sample_path):
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

"""model_card.py: the card a report writes, rendered from a fixed report (model_card.md.jinja), its Hub metadata,
the summary lines, the loss plot, and the global batch in the words the training log uses too."""

import pytest
from huggingface_hub import ModelCard

from model_card import model_card, plot_losses, summary


def side(loss: float, rate: float, median: int, replies: list[str]) -> dict:
    return {
        "heldout_loss": loss,
        "heldout_perplexity": 2 * loss,
        "clean_stop_rate": rate,
        "median_reply_tokens": median,
        "replies": [{"reply": reply} for reply in replies],
    }


@pytest.fixture
def run(tmp_path) -> dict:
    base = tmp_path / "base"  # a local base without a card of its own: license "other", no Hub base model
    base.mkdir()
    return {
        "model_name_or_path": str(base),
        "output_dir": "runs/my-model",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "dataset": "data.jsonl",
        "policy": "best",
        "langs": "",
        "method": "dpo",
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "packing": True,
        "max_length": 512,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0.05,
        "optim": "adamw_torch",
        "max_grad_norm": 0.3,
        "seed": 42,
        "report_repetition_penalty": 1.1,
        "report_max_new_tokens": 128,
        "report_examples": 1,
    }


DATA = {
    "train_examples": 80,
    "heldout_examples": 20,
    "heldout_trees": 20,
    "filters": {"deleted": 3, "kept": 900, "messages": 906},
    "oasst1": True,
    "lora": {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "q_proj,v_proj"},
}
METRICS = {"hardware": "CPU (x86_64, 2 cores)", "train_runtime": 321.5, "train_loss": 1.98766, "processes": 2}
REPORT = {
    "base": side(2.0, 0.4, 57, ["Base one", "Base two"]),
    "sft": side(1.95, 0.85, 40, ["SFT one", "SFT two"]),
    "tuned": side(1.5, 0.9, 33, ["Tuned one", "Tuned two"]),
    "greedy": {"base": {"clean_stop_rate": 0.3}, "sft": {"clean_stop_rate": 0.7}, "tuned": {"clean_stop_rate": 0.8}},
    "preference": {
        "base": {"preference_accuracy": 0.5, "preference_accuracy_per_token": 0.45},
        "sft": {"preference_accuracy": 0.55, "preference_accuracy_per_token": 0.5},
        "tuned": {
            "preference_accuracy": 0.6,
            "preference_accuracy_per_token": 0.55,
            "pairs_scored": 97,
            "reward_accuracy": 0.622,
        },
        "reward_against": "sft",
        "pairs": 97,
    },
    "unquantized": {"base": {"heldout_loss": 1.9}, "tuned": {"heldout_loss": 1.45}},
    "prompts": ["First question?", "Second question?"],
    "heldout_part": "test",
    "assistant_tokens": 4321,
    "loss_ratio": 0.75,
}


def test_the_card_shows_every_figure_of_the_report_in_its_table(run):
    text = str(model_card(run, DATA, METRICS, REPORT, has_plot=True))
    table = text[text.index("| | base | tuned |") : text.index("\n\nThe loss covers")]
    assert table.splitlines() == [
        "| | base | tuned |",
        "|---|---|---|",
        "| Held-out loss (assistant tokens) | 2.0000 | 1.5000 |",
        "| Held-out perplexity | 4.00 | 3.00 |",
        "| Clean-stop rate | 40% | 90% |",
        "| Median reply length (tokens) | 57 | 33 |",
        "| Clean-stop rate, plain greedy | 30% | 80% |",
        "| Preference accuracy, summed log-prob (97 held-out pairs) | 50.0% | 60.0% |",
        "| Preference accuracy, per token log-prob (97 held-out pairs) | 45.0% | 55.0% |",
        "| Reward accuracy: training raised the chosen reply more than the rejected one (against the sft model) | "
        "| 62.2% |",
        "| The SFT adapter it started from: held-out loss, clean stop | | 1.9500, 85%, preference accuracy 55.0% |",
        "| Held-out loss, unquantized base (adapter off / on) | 1.9000 | 1.4500 |",
    ]
    # DPO trains on pairs; the Trainer's count of the global batch is missing, so the card multiplies it out.
    assert "- 20 steps of micro-batch 4 x accumulation 2 x 2 processes = 16 preference pairs, 512 tokens" in text
    assert "training time 322 s;\n  final training loss 1.9877." in text
    assert "deleted 3, rejected in review 0,\n  other languages 0, orphaned 0; kept\n  900 of 906." in text
    assert "start from them.\n\n![training and held-out loss](loss.png)\n\n## Examples" in text
    # --report_examples 1: the first prompt alone, with the base and tuned replies.
    examples = text[text.index("## Examples") : text.index("## Use")]
    assert examples == "## Examples\n\n**Prompt:** First question?\n\n- *Base:* Base one\n- *Tuned:* Tuned one\n\n"
    assert 'from_pretrained("runs/my-model")' in text and text.endswith("--port 8000`.\n")


def test_the_card_metadata_reads_back_as_the_hub_reads_it(run, tmp_path):
    model_card(run, DATA, METRICS, REPORT, has_plot=False).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "other" and card.data.base_model is None  # a local base never goes to the Hub
    assert card.data.datasets == ["OpenAssistant/oasst1"] and card.data.model_name == "my-model"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": 1.5,
        "perplexity": 3.0,
        "clean_stop_rate": 0.9,
    }
    assert "loss.png" not in card.text and "start from them.\n\n## Examples" in card.text


def test_the_summary_lines(run):
    assert summary(REPORT).splitlines() == [
        "held-out loss (assistant tokens), test part, 4321 tokens:",
        "  base unquantized 1.9000 | base 4-bit 2.0000 | tuned on 4-bit 1.5000 (x0.750) | adapter on the unquantized "
        "base 1.4500",
        "clean-stop rate on 2 prompts: base 40% -> tuned 90%; plain greedy: base 30% -> tuned 80%",
        "the SFT adapter it started from: held-out loss 1.9500, clean-stop rate 85% (plain greedy 70%)",
        "preference accuracy on 97 held-out pairs (summed / per-token log-prob): base 50.0% / 45.0% | sft 55.0% / "
        "50.0% | tuned 60.0% / 55.0%; reward accuracy (tuned against sft) 62.2%",
    ]


def test_the_plot_is_drawn_only_when_the_run_logged_a_loss(tmp_path):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    assert plot_losses(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_losses([{"step": 1, "learning_rate": 2e-4}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()

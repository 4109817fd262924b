"""What a report says about a run: its model card (Hub metadata and model_card.md.jinja), the loss plot, and the
summary lines that train.py and the demo print.
"""

import logging
import math
from importlib.metadata import version
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from matplotlib.figure import Figure

from data_utils import HUB_DATASET
from model_utils import hub_unreachable, looks_like_path

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("model_card.md.jinja")
# The held-out figures the Hub shows as the card's model-index results: (metric type, name, key in the report).
HUB_METRICS = (
    ("loss", "Held-out loss", "heldout_loss"),
    ("perplexity", "Held-out perplexity", "heldout_perplexity"),
    ("clean_stop_rate", "Clean-stop rate", "clean_stop_rate"),
)
# The table's rows for every side: (label, key in the report, format).
SIDE_ROWS = (
    ("Held-out loss (assistant tokens)", "heldout_loss", ".4f"),
    ("Held-out perplexity", "heldout_perplexity", ".2f"),
    ("Clean-stop rate", "clean_stop_rate", ".0%"),
    ("Median reply length (tokens)", "median_reply_tokens", "d"),
)


def model_card(run: dict, data: dict, train_metrics: dict, report: dict, has_plot: bool) -> ModelCard:
    """The model card: Hub metadata (base model, license, data set, held-out figures as model-index results) and a
    body with the data, the settings and the figures."""
    base_name = run["model_name_or_path"]
    base_card = base_model_card(base_name)
    # A Hub id, never a local path (the Hub rejects those): a local folder names the Hub model it copies in its card.
    hub_base = base_name if not looks_like_path(base_name) else getattr(base_card, "base_model", None)
    license_ = run.get("license", "auto")
    if license_ == "auto":
        license_ = getattr(base_card, "license", None) or "other"
    name = Path(run["output_dir"]).name
    heldout = {"task_type": "text-generation", "dataset_type": HUB_DATASET, "dataset_name": "oasst1 held-out trees"}
    metadata = ModelCardData(
        model_name=name,
        base_model=hub_base,
        license=license_,
        library_name="peft",
        pipeline_tag="text-generation",
        datasets=[HUB_DATASET] if data["oasst1"] else None,
        tags=["qlora", "lora", "trl", "sft", "oasst1"],
        eval_results=[
            EvalResult(**heldout, metric_type=kind, metric_name=label, metric_value=report["tuned"][key])
            for kind, label, key in HUB_METRICS
        ],
    )
    replies = zip(report["prompts"], report["base"]["replies"], report["tuned"]["replies"], strict=True)
    shown = list(replies)[: run.get("report_examples", 3)]
    body = card_template().render(
        card_data=metadata.to_yaml(),
        name=name,
        run=run,
        data=data,
        filters=data.get("filters", {}),
        train_metrics=train_metrics,
        report=report,
        global_batch=card_global_batch(run, train_metrics),
        versions=framework_versions(),
        rows=evaluation_rows(report),
        has_plot=has_plot,
        examples=[(prompt, b["reply"][:600], t["reply"][:600]) for prompt, b, t in shown],
        # Where a reader loads it from: the Hub repository the run uploads to (--push_to_hub), else the output folder.
        where=run["hub_model_id"] if run.get("push_to_hub") and run.get("hub_model_id") else run["output_dir"],
        nan=math.nan,
    )
    return ModelCard(body)


def card_template() -> jinja2.Template:
    """model_card.md.jinja; a name the template uses and the report does not pass is an error, not an empty cell."""
    environment = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE.read_text(encoding="utf-8"))


def evaluation_rows(report: dict) -> list[list[str]]:
    """The evaluation table's rows, as cells (label, base, tuned; an empty cell where a figure has no base)."""
    base, tuned, greedy = report["base"], report["tuned"], report["greedy"]
    rows = [[label, f"{base[key]:{fmt}}", f"{tuned[key]:{fmt}}"] for label, key, fmt in SIDE_ROWS]
    rows.append(
        [
            "Clean-stop rate, plain greedy",
            f"{greedy['base']['clean_stop_rate']:.0%}",
            f"{greedy['tuned']['clean_stop_rate']:.0%}",
        ]
    )
    if "preference" in report:
        preference = report["preference"]
        pairs = preference["tuned"]["pairs_scored"]
        for label, key in (("summed", "preference_accuracy"), ("per token", "preference_accuracy_per_token")):
            rows.append(
                [
                    f"Preference accuracy, {label} log-prob ({pairs} held-out pairs)",
                    f"{preference['base'][key]:.1%}",
                    f"{preference['tuned'][key]:.1%}",
                ]
            )
        rows.append(
            [
                "Reward accuracy: training raised the chosen reply more than the rejected one (against the "
                f"{preference['reward_against']} model)",
                "",
                f"{preference['tuned']['reward_accuracy']:.1%}",
            ]
        )
    if "sft" in report:  # the SFT adapter a DPO or ORPO run started from
        sft = f"{report['sft']['heldout_loss']:.4f}, {report['sft']['clean_stop_rate']:.0%}"
        if "preference" in report:
            sft += f", preference accuracy {report['preference']['sft']['preference_accuracy']:.1%}"
        rows.append(["The SFT adapter it started from: held-out loss, clean stop", "", sft])
    if "unquantized" in report:
        unquantized = report["unquantized"]
        rows.append(
            [
                "Held-out loss, unquantized base (adapter off / on)",
                f"{unquantized['base']['heldout_loss']:.4f}",
                f"{unquantized['tuned']['heldout_loss']:.4f}",
            ]
        )
    return rows


def summary(report: dict) -> str:
    """The report's figures in a few lines, as the demo and train.py print them."""
    base, tuned, greedy = report["base"], report["tuned"], report["greedy"]
    lines = [f"held-out loss (assistant tokens), {report['heldout_part']} part, {report['assistant_tokens']} tokens:"]
    if "unquantized" in report:
        unquantized = report["unquantized"]
        lines.append(
            f"  base unquantized {unquantized['base']['heldout_loss']:.4f} | base 4-bit {base['heldout_loss']:.4f} | "
            f"tuned on 4-bit {tuned['heldout_loss']:.4f} (x{report['loss_ratio']:.3f}) | adapter on the unquantized "
            f"base {unquantized['tuned']['heldout_loss']:.4f}"
        )
    else:
        lines.append(
            f"  base {base['heldout_loss']:.4f} | tuned {tuned['heldout_loss']:.4f} (x{report['loss_ratio']:.3f})"
        )
    lines.append(
        f"clean-stop rate on {len(report['prompts'])} prompts: base {base['clean_stop_rate']:.0%} -> tuned "
        f"{tuned['clean_stop_rate']:.0%}; plain greedy: base {greedy['base']['clean_stop_rate']:.0%} -> tuned "
        f"{greedy['tuned']['clean_stop_rate']:.0%}"
    )
    if "sft" in report:
        sft = report["sft"]
        lines.append(
            f"the SFT adapter it started from: held-out loss {sft['heldout_loss']:.4f}, clean-stop rate "
            f"{sft['clean_stop_rate']:.0%} (plain greedy {greedy['sft']['clean_stop_rate']:.0%})"
        )
    if "preference" in report:
        preference = report["preference"]
        shown = " | ".join(
            f"{name} {figures['preference_accuracy']:.1%} / {figures['preference_accuracy_per_token']:.1%}"
            for name, figures in preference.items()
            if name in ("base", "sft", "tuned")
        )
        lines.append(
            f"preference accuracy on {preference['tuned']['pairs_scored']} held-out pairs (summed / per-token "
            f"log-prob): {shown}; reward accuracy (tuned against {preference['reward_against']}) "
            f"{preference['tuned']['reward_accuracy']:.1%}"
        )
    return "\n".join(lines)


def base_model_card(name_or_path: str):
    """The base model's own card data (for its license and Hub id), or None where there is none to be had offline."""
    try:
        if looks_like_path(name_or_path):
            readme = Path(name_or_path) / "README.md"
            return ModelCard.load(readme).data if readme.is_file() else None
        cached = try_to_load_from_cache(name_or_path, "README.md")
        if isinstance(cached, str):
            return ModelCard.load(cached).data
        return None if hub_unreachable(name_or_path) else ModelCard.load(name_or_path).data
    except (OSError, ValueError) as e:  # no card, a malformed one, or no network
        logger.warning("No model card for %s (%s): the license is 'other'; pass --license to set it.", name_or_path, e)
        return None


def card_global_batch(run: dict, train_metrics: dict) -> str:
    """The run's global batch (trainer_setup.global_batch), from its settings and the Trainer's own count."""
    # Imported here, when a card is written: trainer_setup loads TRL, peft and bitsandbytes, whose import logs a known
    # line (cli_utils.QUIET_LOG_MESSAGES) before `python report.py` or demo.py has set up the logging that filters it.
    from trainer_setup import global_batch

    processes = train_metrics.get("processes", 1)
    micro_batch, accumulation = run["per_device_train_batch_size"], run["gradient_accumulation_steps"]
    total = train_metrics.get("global_batch_size", micro_batch * accumulation * processes)
    pairs = run.get("method", "sft") != "sft"
    return global_batch(micro_batch, accumulation, processes, total, pairs, run.get("packing"), run["max_length"])


def framework_versions() -> str:
    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"))


def plot_losses(log_history: list[dict], path: Path) -> bool:
    """loss.png: the training and held-out losses against step; False (and no file) when the run logged neither."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    held_out = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not held_out:
        return False
    fig = Figure(figsize=(7, 4))  # matplotlib's object API: no pyplot, no display, no global backend to set
    ax = fig.subplots()
    for points, label, style in ((train, "training loss", "-"), (held_out, "held-out loss", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True

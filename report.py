"""What did the fine-tune change? Base vs tuned on held-out conversations, with a model card.

    python report.py --model_dir model          # also runs at the end of train.py (--final_report)
    python report.py --model_dir model --report_prompts 20 --report_repetition_penalty 1.0

Reads the run's settings from model_dir/run_config.yaml, rebuilds the same held-out conversations that training
evaluated on (training_examples.prepare_examples), loads the base once and switches the adapter off for the base
figures (scoring.py), then writes to model_dir:
- eval.json: held-out loss and perplexity on assistant tokens, and the clean-stop rate (greedy replies to held-out
  prompts that end with EOS within the budget and invent no "### Human:" turn), for base and tuned;
- loss.png: training and held-out loss against step;
- README.md: a model card (model_card.py) with the data, settings, hardware, time and the figures above;
- generation_config.json: the decoding settings the clean stops were measured with, which inference.py, app.py and
  the merged model start from.
"""

import gc
import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapter_utils import find_adapter, load_chat_model
from checkpoint_utils import read_run_config
from cli_utils import argument_parser, fail, quiet_known_noise
from config import DataArguments, ModelArguments, QuantizationArguments, ReportArguments, UserError
from data_utils import Conversations, DataError, load_train_and_eval
from generation_utils import documented_decoding
from model_card import model_card, plot_losses, summary
from model_utils import is_main_process
from scoring import START_ADAPTER, figures, losses, preference_accuracy
from training_examples import prepare_examples

logger = logging.getLogger(__name__)

# The pairs every run is scored on, whatever it trained on, so that preference figures compare across runs.
REPORT_PAIR_POLICY = "best_vs_rest"


@dataclass
class ReportFolderArguments:
    model_dir: str = field(default="model", metadata={"help": "A training output folder (with run_config.yaml)."})


def main(args: list[str] | None = None) -> dict | None:
    """Write the report of a finished run; a user's mistake ends in one line (exit 2)."""
    if not is_main_process():  # under torchrun/accelerate launch: one process evaluates and writes the report
        return None
    try:
        return write_report(*parse_args(args))
    except UserError as e:
        fail(str(e))


def parse_args(args: list[str] | None) -> tuple[Path, dict, ReportArguments]:
    """The output folder, its run_config.yaml, and the report settings: the run's, with these flags' overrides."""
    parser = argument_parser((ReportFolderArguments, ReportArguments), description=__doc__)
    known, unknown = parser.parse_known_args(args)
    report_flags = {f"--{f.name}" for f in fields(ReportArguments)}
    for flag in unknown:
        if flag.startswith("--") and flag.split("=")[0] not in report_flags:
            flags = ", ".join(sorted(report_flags))
            raise UserError(f"{flag}: report.py takes --model_dir and the report settings ({flags}).")
    folder = Path(known.model_dir)
    run = read_run_config(folder)
    parser.set_defaults(**{f.name: run[f.name] for f in fields(ReportArguments) if f.name in run})
    _, report_args = parser.parse_args_into_dataclasses(args)
    return folder, run, report_args


def write_report(folder: Path, run: dict, report_args: ReportArguments) -> dict:
    """Score the run in `folder` and write its report files; returns the figures (eval.json without its data part)."""
    # 1. The held-out conversations: the test part if the run has one, else the dev part training evaluated on.
    # Never filtered by length: a long conversation is scored on its first --max_length tokens.
    train_data, dev, test = load_train_and_eval(settings(DataArguments, run))
    held_out, part = (test, "test") if test and report_args.report_on == "test" else (dev, "dev")
    if held_out is None or not held_out.examples:
        raise UserError("no held-out data in this run: train with --eval_fraction, --eval_dataset or --eval_split.")
    model_args, quant_args = settings(ModelArguments, run), settings(QuantizationArguments, run)
    base = model_args.model_name_or_path
    pairs = held_out_pairs(settings(DataArguments, run), part)
    model, tokenizer = load_chat_model(folder, base, quant_args, model_args.attn_implementation)
    if run.get("init_adapter"):  # a DPO or ORPO run from an SFT adapter: that adapter is compared too
        model.load_adapter(str(find_adapter(run["init_adapter"])), adapter_name=START_ADAPTER)
        model.set_adapter("default")
    train_data = prepare_examples(train_data, tokenizer, run["max_length"], run["long_examples"])

    # 2. The figures, base (adapter off), the adapter the run started from (if any) and tuned, on the base as trained
    # (4-bit): loss, clean stops and preference accuracy on held-out pairs; then the losses on the unquantized base,
    # to show what quantization cost and what the adapter buys back.
    report = figures(model, tokenizer, held_out, report_args, run["max_length"])
    report["heldout_part"], report["heldout_ids"] = part, [e["id"] for e in held_out.examples]
    if pairs is not None:
        report["preference"] = preference_accuracy(model, tokenizer, pairs, run["max_length"])
    # The decoding settings the clean-stop rate was measured with become the adapter's own: inference.py, app.py,
    # the merged model and any generate() start from them.
    documented_decoding(tokenizer, report_args).save_pretrained(folder)
    if quant_args.load_in_4bit:
        del model
        gc.collect()
        unquantized = QuantizationArguments(
            load_in_4bit=False, bnb_4bit_compute_dtype=quant_args.bnb_4bit_compute_dtype
        )
        model, _ = load_chat_model(folder, base, unquantized, model_args.attn_implementation)
        report["unquantized"] = losses(model, tokenizer, held_out, run["max_length"])
    del model
    gc.collect()

    # 3. The files: eval.json, loss.png, README.md.
    data = {
        "train_examples": len(train_data.examples),
        "heldout_examples": len(held_out.examples),
        "heldout_trees": len({e["tree_id"] for e in held_out.examples}),
        "filters": dict(train_data.counts),
        "oasst1": "messages" in train_data.counts,  # built from oasst1 rows or trees, not the user's own chats
        "lora": lora_settings(folder),
    }
    write_files(folder, {**run, **vars(report_args)}, data, report)
    return report


def write_files(folder: Path, run: dict, data: dict, report: dict) -> None:
    """eval.json (the figures, the data and the training metrics), loss.png and README.md, and the summary lines."""
    state_file, metrics_file = folder / "trainer_state.json", folder / "train_results.json"
    log_history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    train_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    train_metrics.pop("heldout_ids", None)
    has_plot = plot_losses(log_history, folder / "loss.png")
    (folder / "eval.json").write_text(json.dumps({**report, "data": data, "training": train_metrics}, indent=2))
    model_card(run, data, train_metrics, report, has_plot).save(folder / "README.md")
    print(
        summary(report)
        + f"; wrote {folder / 'eval.json'}, {folder / 'README.md'}"
        + (", loss.png" if has_plot else "")
    )


def held_out_pairs(data_args: DataArguments, part: str) -> Conversations | None:
    """The preference pairs (best_vs_rest, whatever the run trained on, so that every run is scored on the same
    pairs) of the held-out trees the report scores; None where the data has no ranks (your own conversations)."""
    try:
        _, dev, test = load_train_and_eval(data_args, held_out_policy=REPORT_PAIR_POLICY)
    except DataError as e:
        logger.info("No preference accuracy: %s", e)
        return None
    pairs = test if part == "test" else dev
    return pairs if pairs is not None and pairs.examples else None


def lora_settings(folder: Path) -> dict:
    """The adapter's own record of its LoRA settings (what was trained, whatever the config file said)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = config["target_modules"]
    config["target_modules"] = ",".join(sorted(targets)) if isinstance(targets, list) else targets
    return {key: config[key] for key in ("r", "lora_alpha", "lora_dropout", "target_modules")}


def settings(cls, run: dict):
    """One settings dataclass, filled from run_config.yaml."""
    return cls(**{f.name: run[f.name] for f in fields(cls) if f.init and f.name in run})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    quiet_known_noise()
    main()

"""Fine-tune a causal LM on oasst1 conversations with QLoRA (4-bit nf4 base + LoRA adapter).

    python train.py                                          # Phi-2 on OpenAssistant/oasst1 (GPU, Hub access)
    python train.py --config configs/phi2_oasst1.yaml --max_steps 100
    python train.py --config configs/tiny_cpu.yaml           # a small run on CPU, no network
    python train.py --resume                                 # continue from the latest checkpoint in model/
    torchrun --nproc_per_node 4 train.py                     # 4 GPUs, one process each
    python train.py --method dpo --init_adapter model --policy best_vs_rest --output_dir model-dpo  # preference tuning
    python train.py --help                                   # every setting, with its reason

Writes to --output_dir (model/ by default): checkpoint-N/ folders while training, then the final LoRA adapter, the
tokenizer with the portable chat template, run_config.yaml last (every setting of this run; pass it back with
--config), and the report (report.py); --push_to_hub then uploads the folder to the Hugging Face Hub (hub_utils.py).
A finished run is never trained over without --overwrite; --resume continues or extends one (checkpoint_utils.py
tells how). Ctrl-C or SIGTERM saves a checkpoint after the current step and prints the command
that resumes. One run at a time per output folder: a second one ends at once, naming the first (run_lock.py).
"""

import logging
import sys
from dataclasses import asdict

from cli_utils import fail, quiet_known_noise
from config import UserError

logger = logging.getLogger(__name__)


def main(args: list[str] | None = None):
    """Train, save and report; a user's mistake ends in one line (exit 2) before anything is written."""
    try:
        return train(args)
    except UserError as e:
        fail(str(e))


def train(args: list[str] | None):
    # The libraries load inside these functions, once the entry point has set up logging: bitsandbytes logs a known
    # line when it is imported, which quiet_known_noise filters from then on; and argument errors answer at once.
    from model_utils import is_main_process
    from run_lock import output_dir_lock
    from train_settings import parse_train_args

    settings = parse_train_args(args)
    *_, training_args = settings
    # One run per output folder: locked before anything is written there, to the end of the run (run_lock.py tells
    # how); a second run on it ends here.
    with output_dir_lock(training_args.output_dir, take=is_main_process()):
        return train_in_locked_folder(args, *settings)


def train_in_locked_folder(args, model_args, quant_args, lora_args, data_args, report_args, training_args):
    from datasets import Dataset
    from transformers import set_seed

    import checkpoint_utils
    from adapter_utils import build_lora_config
    from data_utils import load_train_and_eval
    from model_utils import is_main_process, load_model, load_tokenizer
    from quantization_utils import dtype_name, for_training
    from train_callbacks import exit_if_stopped, stop_on_signal
    from trainer_setup import build_trainer, global_batch_message
    from training_examples import prepare_examples, to_training_records

    if not is_main_process():  # under torchrun/accelerate launch the main process speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(training_args.seed)
    output_dir = training_args.output_dir

    # 1. Where to write: never over a finished run; an unfinished one is continued with --resume.
    resume_from = checkpoint_utils.check_output_dir(output_dir, training_args.resume, training_args.overwrite)
    if resume_from:
        logger.info("Resuming from %s", resume_from)

    # 2. Data: oasst1 (or your conversations) -> examples in the conversation template, with the tokenizer's lengths;
    # for dpo and orpo, oasst1's ranked replies -> preference pairs. The dev part (conversations, or the pairs of the
    # same trees) is evaluated during training; the test part is the report's alone (data_utils.load_train_and_eval).
    held_out_policy = "best" if training_args.method == "sft" else data_args.policy
    train_data, eval_data, _ = load_train_and_eval(data_args, held_out_policy)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    train_data = prepare_examples(train_data, tokenizer, training_args.max_length, data_args.long_examples)

    # 3. The 4-bit base, computing in the run's mixed precision, and the trainer for --method: TRL's SFTTrainer
    # tokenizes, masks the loss to assistant turns and adds the adapter; its DPOTrainer or ORPOTrainer does the same
    # for pairs (or continues --init_adapter).
    loading = for_training(quant_args, training_args.bf16, training_args.fp16)
    model = load_model(model_args, loading, training_args.trust_remote_code)
    logger.info("The base computes in %s.", dtype_name(model.dtype))
    trainer = build_trainer(
        model,
        tokenizer,
        training_args,
        train_dataset=Dataset.from_list(to_training_records(train_data)),
        eval_dataset=Dataset.from_list(to_training_records(eval_data)) if eval_data else None,
        peft_config=build_lora_config(lora_args, model.config.model_type),
    )
    del model  # the trainer holds it now, and lets go of it before the report (step 6)
    if is_main_process():
        trainer.model.print_trainable_parameters()
        logger.info(global_batch_message(trainer))

    # 4. Train (progress bar and loss lines come from the Trainer). Only now is the previous run cleared away.
    if is_main_process():  # the process that writes checkpoints
        if training_args.overwrite:
            checkpoint_utils.remove_previous_run(output_dir)
        checkpoint_utils.remove_interrupted_saves(output_dir, resume_from)
    with stop_on_signal(trainer) as stop:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    exit_if_stopped(trainer, stop, [sys.argv[0], *(sys.argv[1:] if args is None else args)])

    # 5. Save the adapter, the tokenizer, the loss history and every setting of this run.
    settings = (model_args, quant_args, lora_args, data_args, report_args, training_args)
    save_run(trainer, result, tokenizer, eval_data, settings)

    # 6. Report: base vs tuned on the held-out data -> eval.json, loss.png, README.md (a model card). One process
    # writes it; the others are done (waiting would only hold their devices).
    reported = False
    if report_args.final_report and (eval_data or data_args.test_fraction) and is_main_process():
        reported = report_run(trainer)

    # 7. Share (--push_to_hub): the finished folder to the Hub after the report, so the card holds its figures.
    if training_args.push_to_hub and is_main_process():
        from hub_utils import push_run

        push_run(training_args, reported)
    return trainer, result


def save_run(trainer, result, tokenizer, eval_data, settings) -> None:
    """The adapter, the tokenizer with the portable chat template (over the Trainer's copy, which has the training
    one, as checkpoints keep it: they are for --resume), the trainer's state and metrics, and run_config.yaml last.
    Every process calls the Trainer's savers (they write on the main process; FSDP gathers weights from all)."""
    import checkpoint_utils
    from adapter_utils import drop_reference_adapter
    from model_utils import describe_hardware, is_main_process, save_tokenizer

    training_args = settings[-1]
    output_dir = training_args.output_dir
    drop_reference_adapter(trainer)  # DPO from --init_adapter: the frozen reference copy is not part of the result
    trainer.save_model(output_dir)
    trainer.save_state()
    metrics = {
        **result.metrics,
        "hardware": describe_hardware(training_args.world_size),
        "processes": training_args.world_size,
        "global_batch_size": trainer.get_total_train_batch_size(training_args),
        "heldout_ids": [e["id"] for e in eval_data.examples] if eval_data else [],
    }
    trainer.save_metrics("train", metrics, combined=False)
    if is_main_process():
        save_tokenizer(tokenizer, output_dir)
        checkpoint_utils.write_run_config(output_dir, run_settings(*settings))
        logger.info("Saved the adapter to %s (train loss %.4f).", output_dir, result.training_loss)
    trainer.accelerator.wait_for_everyone()  # every process returns with the output folder complete


def report_run(trainer) -> bool:
    """The report (report.py) of the run just saved: it loads the base again with the saved adapter (the figures are
    what users get), after training has let go of its model and optimizer. Whether a report was written."""
    import report
    from trainer_setup import release_training_state

    output_dir = trainer.args.output_dir
    if trainer.is_fsdp_enabled:  # the report loads the whole base on one device, which FSDP was used to avoid
        logger.info("FSDP: no report here; run `python report.py --model_dir %s` on one GPU.", output_dir)
        return False
    release_training_state(trainer)
    return report.main(["--model_dir", output_dir]) is not None


def run_settings(*settings) -> dict:
    """Every setting of the run as plain values for run_config.yaml; resuming or replacing is a command-line choice."""
    *plain, training_args = settings
    values = {key: value for group in plain for key, value in asdict(group).items()}
    for key, value in training_args.to_dict().items():
        if not key.startswith("_"):
            # to_dict writes "<EOS_TOKEN>" for every *_token field: keep the real value, and never a secret.
            values[key] = getattr(training_args, key) if key.endswith("_token") else value
    return {**values, "resume": False, "overwrite": False, "hub_token": None}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    quiet_known_noise()
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: nothing half-saved is ever resumed
        print("error: aborted; --resume continues from the last complete checkpoint, if any.", file=sys.stderr)
        raise SystemExit(130) from None

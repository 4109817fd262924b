"""Fine-tune a causal LM on oasst1 conversations with QLoRA (4-bit nf4 base + LoRA adapter).

    python train.py                                          # Phi-2 on OpenAssistant/oasst1 (GPU, Hub access)
    python train.py --config configs/phi2_oasst1.yaml --max_steps 100
    python train.py --config configs/tiny_cpu.yaml           # a small run on CPU, no network
    python train.py --resume                                 # continue from the latest checkpoint in model/
    torchrun --nproc_per_node 4 train.py                     # 4 GPUs (README: "Multi-GPU and multi-node")
    python train.py --help                                   # every setting, with its reason

Writes to --output_dir (model/ by default): checkpoint-N/ folders while training, then the final LoRA adapter, the
tokenizer with its chat template, and run_config.yaml last (every setting of this run; pass it back with --config).
A folder with a finished run is never trained into again without --overwrite (or --resume, to extend it).

Crashes and interruptions: the Trainer writes each checkpoint's files in turn, trainer_state.json last; --resume takes
the newest checkpoint that has them all and skips one whose save was cut short (kill -9, power loss, full disk).
Ctrl-C or SIGTERM saves a checkpoint at the end of the current step, then exits with the command that resumes.
"""

import logging
import shlex
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from config import ConfigError, fail, parse_train_args
from data_utils import (
    DataError,
    drop_long_examples,
    drop_untrainable_examples,
    load_train_and_eval,
    to_training_records,
)
from evaluate import describe_hardware

logger = logging.getLogger(__name__)


def main(args: list[str] | None = None):
    # Heavy imports here, so `--help` and argument errors answer at once.
    try:
        model_args, quant_args, lora_args, data_args, report_args, training_args = parse_train_args(args)
    except (ConfigError, ValueError) as e:
        fail(str(e))

    from datasets import Dataset
    from transformers import set_seed

    from adapter_utils import build_lora_config
    from model_utils import (
        ModelError,
        build_trainer,
        check_output_dir,
        global_batch_message,
        is_main_process,
        load_model,
        load_tokenizer,
        remove_incomplete_checkpoints,
        remove_previous_run,
        stop_on_signal,
    )

    if not is_main_process():  # under torchrun/accelerate launch the main process speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(training_args.seed)
    output_dir = training_args.output_dir

    # Every check a user's input can fail comes before the model loads, and before anything is written.
    # 1. Where to write: never over a finished run; an unfinished one is continued with --resume.
    try:
        resume_from = check_output_dir(output_dir, training_args.resume, training_args.overwrite)
    except ModelError as e:
        fail(str(e))
    if resume_from:
        logger.info("Resuming from %s", resume_from)

    # 2. Data: oasst1 (or your conversations) -> examples in the conversation template.
    try:
        train_data, eval_data = load_train_and_eval(data_args)
    except DataError as e:
        fail(str(e))

    # 3. Tokenizer (with the template as its chat_template) and the 4-bit base model.
    try:
        tokenizer = load_tokenizer(
            model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
        )
        if data_args.long_examples == "drop":
            train_data = drop_long_examples(train_data, tokenizer, training_args.max_length)
            eval_data = eval_data and drop_long_examples(eval_data, tokenizer, training_args.max_length)
        train_data = drop_untrainable_examples(train_data, tokenizer, training_args.max_length)
        eval_data = eval_data and drop_untrainable_examples(eval_data, tokenizer, training_args.max_length)
        model = load_model(model_args, quant_args, training_args.trust_remote_code)
    except (DataError, ModelError) as e:
        fail(str(e))

    # 4. Trainer: SFTTrainer tokenizes, masks the loss to assistant turns, and adds the LoRA adapter.
    trainer = build_trainer(
        model,
        tokenizer,
        training_args,
        train_dataset=Dataset.from_list(to_training_records(train_data)),
        eval_dataset=Dataset.from_list(to_training_records(eval_data)) if eval_data else None,
        peft_config=build_lora_config(lora_args, model.config.model_type),
    )
    if is_main_process():
        trainer.model.print_trainable_parameters()
        logger.info(global_batch_message(trainer))

    # 5. Train (progress bar and loss lines come from the Trainer). Only now is the previous run cleared away.
    if is_main_process():  # the process that writes checkpoints
        if training_args.overwrite:
            remove_previous_run(output_dir)
        remove_incomplete_checkpoints(output_dir, resume_from)
    with stop_on_signal(trainer) as stop:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.signal_name:
        command = [sys.argv[0], *(sys.argv[1:] if args is None else args)]
        command = [arg for arg in command if arg not in ("--resume", "--overwrite")] + ["--resume"]
        logger.log(
            logging.WARNING if is_main_process() else logging.DEBUG,  # one message for all processes
            "Stopped by %s at step %d; the checkpoint is saved in %s. Continue with:\n  python %s",
            stop.signal_name,
            trainer.state.global_step,
            output_dir,
            shlex.join(command),
        )
        raise SystemExit(128 + signal.Signals[stop.signal_name])

    # 6. Save the adapter, the tokenizer with its chat template, the loss history, and every setting of this run.
    # Under torchrun/accelerate every process calls the Trainer's savers (they write on the main process only, and
    # FSDP needs all processes to gather the weights); the main process writes the rest while the others wait.
    trainer.save_model(output_dir)
    trainer.save_state()
    metrics = {
        **result.metrics,
        "hardware": describe_hardware(training_args.world_size),
        "processes": training_args.world_size,
        "global_batch_size": trainer.get_total_train_batch_size(training_args),
    }
    trainer.save_metrics("train", metrics, combined=False)
    if is_main_process():
        tokenizer.save_pretrained(output_dir)
        run_config = {
            **asdict(model_args),
            **asdict(quant_args),
            **asdict(lora_args),
            **asdict(data_args),
            **asdict(report_args),
            **{k: v for k, v in training_args.to_dict().items() if not k.startswith("_")},
            # The file reproduces the run; resuming or replacing a run is a choice made on the command line.
            "resume": False,
            "overwrite": False,
        }
        # run_config.yaml last: it marks the run as finished (a folder without it has no final adapter to trust).
        with open(f"{output_dir}/run_config.yaml.tmp", "w") as f:
            yaml.safe_dump(run_config, f, sort_keys=False)
        Path(f"{output_dir}/run_config.yaml.tmp").replace(f"{output_dir}/run_config.yaml")
        logger.info("Saved the adapter to %s (train loss %.4f).", output_dir, result.training_loss)
    trainer.accelerator.wait_for_everyone()  # every process returns with the output folder complete

    # 7. Report: base vs tuned on the held-out data -> eval.json, loss.png, README.md (a model card). One process
    # writes it; the others are done (waiting would only hold their devices).
    if report_args.final_report and eval_data is not None and is_main_process():
        import evaluate

        if trainer.is_fsdp_enabled:  # the report loads the whole base on one device, which FSDP was used to avoid
            logger.info("FSDP: no report here; run `python evaluate.py --model_dir %s` on one GPU.", output_dir)
        else:
            evaluate.main(["--model_dir", output_dir])  # reloads the saved adapter: the figures are what users get
    return trainer, result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: nothing half-saved is ever resumed
        print("error: aborted; --resume continues from the last complete checkpoint, if any.", file=sys.stderr)
        raise SystemExit(130) from None

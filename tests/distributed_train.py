"""Test helper, not a test: train.py's main under torchrun or accelerate launch, then this process's final LoRA
weights to $LORA_DUMP_DIR/rank{N}.safetensors, so that tests/test_distributed.py can compare the processes."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dump_lora_weights(trainer) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = {name: w.detach().cpu().contiguous() for name, w in get_peft_model_state_dict(trainer.model).items()}
    save_file(weights, Path(os.environ["LORA_DUMP_DIR"]) / f"rank{trainer.args.process_index}.safetensors")


if __name__ == "__main__":
    import logging

    import train
    import trainer_setup

    # The main process lets go of its model before the report: its weights are taken just before.
    release = trainer_setup.release_training_state
    trainer_setup.release_training_state = lambda trainer: (dump_lora_weights(trainer), release(trainer))

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    trainer, _ = train.main(sys.argv[1:])
    if trainer.model is not None:  # no report ran in this process
        dump_lora_weights(trainer)

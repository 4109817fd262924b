"""Test helper, not a test: train.py's main under torchrun or accelerate launch, then this process's final LoRA
weights to $LORA_DUMP_DIR/rank{N}.safetensors, so that tests/test_distributed.py can compare the processes."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import logging

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    import train

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    trainer, _ = train.main(sys.argv[1:])
    weights = {name: w.detach().cpu().contiguous() for name, w in get_peft_model_state_dict(trainer.model).items()}
    save_file(weights, Path(os.environ["LORA_DUMP_DIR"]) / f"rank{trainer.args.process_index}.safetensors")

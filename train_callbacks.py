"""Clean stops of a training run, as Trainer callbacks: Ctrl-C or SIGTERM saves a checkpoint after the current step,
a nan/inf loss stops before anything of its step is saved; after training, the exit code and the one line that says
what to do next (`exit_if_stopped`).
"""

import contextlib
import logging
import shlex
import signal

import torch
from transformers import TrainerCallback

from checkpoint_utils import latest_checkpoint
from cli_utils import fail
from model_utils import is_main_process

logger = logging.getLogger(__name__)


class StopOnSignal(TrainerCallback):
    """After Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, `kill`): save a checkpoint at the end of the current
    optimizer step and stop, so that --resume continues exactly there. Installed by `stop_on_signal`."""

    def __init__(self):
        self.signal_name: str | None = None

    def handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: give up on the clean stop
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: saving a checkpoint after this step, then stopping (again to abort).", self.signal_name)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Under torchrun each process gets the signal at its own moment: agree on the step to stop at, or one
            # process would wait forever for the others in the next step's gradient all-reduce.
            stop = torch.tensor(int(self.signal_name is not None), device=args.device)
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            if stop.item() and self.signal_name is None:
                self.signal_name = "SIGTERM"  # received by another process
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def stop_on_signal(trainer):
    """`with stop_on_signal(trainer) as stop: trainer.train()`; afterwards `stop.signal_name` says whether a signal
    stopped the run. The previous handlers are back once the block ends."""
    callback = StopOnSignal()
    trainer.add_callback(callback)
    # The stop on a nan/inf loss keeps the last word on saving: a signal in that same step must not save its state.
    nonfinite = trainer.pop_callback(StopOnNonFiniteLoss)
    if nonfinite is not None:
        trainer.add_callback(nonfinite)
    previous = {signum: signal.signal(signum, callback.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield callback
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(callback)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the end of the first optimizer step whose loss is nan or inf, without evaluating or saving that step:
    the newest checkpoint on disk stays the last good one. Afterwards `step` is the step it stopped at (None: it did
    not). The trainer's `training_step` reports each micro-batch's loss to `observe`.

    fp16 overflow (Phi-2's attention on a T4) shows up this way; so does a learning rate far too high. Left running,
    such a run only logs nan to the end, and its later checkpoints hold nan weights (or, under fp16, weights the
    GradScaler stopped updating)."""

    def __init__(self):
        self.step: int | None = None
        self.nonfinite: torch.Tensor | None = None  # on the device: read once per optimizer step, not per micro-batch

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad

    def on_step_end(self, args, state, control, **kwargs):
        if self.nonfinite is None:
            return control
        stop = self.nonfinite.to(device=args.device, dtype=torch.int32)
        self.nonfinite = None
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Every process stops at the same step, or the others would wait forever in the next all-reduce.
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if stop.item():
            self.step = state.global_step
            control.should_training_stop = True
        return self.keep_the_broken_state_out(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.keep_the_broken_state_out(control)

    def keep_the_broken_state_out(self, control):
        if self.step is not None:
            control.should_save = control.should_evaluate = False
        return control


def nonfinite_loss_message(args, step: int) -> str:
    """What went wrong at `step` of a run with these training arguments, where its last good checkpoint is, and what
    to do: one line."""
    last = latest_checkpoint(args.output_dir)
    if last is not None:
        kept = f"{last} is the last good checkpoint (nothing of step {step} was saved)"
        resume = "; then --resume continues from it"
    else:
        kept, resume = "no checkpoint was saved before it", ""
    if args.fp16:
        return (
            f"the training loss became nan/inf at step {step}: float16 overflowed (Phi-2's activations can exceed its "
            f"range); {kept}. Train on a GPU with bf16 (compute capability 8.0 or newer: A100, L4, RTX 30xx and "
            f"newer), or compute in float32: --bnb_4bit_compute_dtype float32 --fp16 false (slower){resume}."
        )
    return (
        f"the training loss became nan/inf at step {step}; {kept}. Lower --learning_rate (now {args.learning_rate:g}) "
        f"and start again with --overwrite, or check the data."
    )


def exit_if_stopped(trainer, stop: StopOnSignal, command: list[str]) -> None:
    """After trainer.train(): exit at a nan/inf loss (one line, code 1; nothing of that step was saved, so the last
    checkpoint is good), or after Ctrl-C/SIGTERM (code 128 + the signal) with the command that resumes."""
    if trainer.nonfinite_loss.step is not None:
        if is_main_process():
            fail(nonfinite_loss_message(trainer.args, trainer.nonfinite_loss.step), code=1)
        raise SystemExit(1)
    if stop.signal_name:
        command = [arg for arg in command if arg not in ("--overwrite", "--resume")] + ["--resume"]
        logger.log(
            logging.WARNING if is_main_process() else logging.DEBUG,  # one message for all processes
            "Stopped by %s at step %d; the checkpoint is saved in %s. Continue with:\n  python %s",
            stop.signal_name,
            trainer.state.global_step,
            trainer.args.output_dir,
            shlex.join(command),
        )
        raise SystemExit(128 + signal.Signals[stop.signal_name])

"""train_callbacks.py: the clean stops of a run (Ctrl-C/SIGTERM, a nan/inf loss) and the line that says what to do.
A whole run that stops at a nan loss is in test_precision.py; Ctrl-C and SIGTERM in a real run, in test_resume.py."""

import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from train_callbacks import StopOnNonFiniteLoss, StopOnSignal, nonfinite_loss_message


def test_nonfinite_loss_message_says_what_to_do(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path), fp16=True, learning_rate=2e-4)
    assert nonfinite_loss_message(args, 3) == (
        "the training loss became nan/inf at step 3: float16 overflowed (Phi-2's activations can exceed its range); "
        "no checkpoint was saved before it. Train on a GPU with bf16 (compute capability 8.0 or newer: A100, L4, RTX "
        "30xx and newer), or compute in float32: --bnb_4bit_compute_dtype float32 --fp16 false (slower)."
    )


def test_a_second_signal_aborts_at_once():
    stop, control, args = StopOnSignal(), TrainerControl(), SimpleNamespace(world_size=1)
    stop.on_step_end(args, None, control)
    assert not control.should_save and not control.should_training_stop  # no signal: training goes on
    stop.handle(signal.SIGINT, None)
    stop.on_step_end(args, None, control)
    assert control.should_save and control.should_training_stop and stop.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # train.py turns it into "error: aborted ..." and exit code 130
        stop.handle(signal.SIGINT, None)


def test_a_nonfinite_loss_stops_at_the_end_of_its_step_and_keeps_its_state_out():
    stop, control, args = StopOnNonFiniteLoss(), TrainerControl(), SimpleNamespace(world_size=1, device="cpu")
    state = TrainerState(global_step=1)
    stop.observe(torch.tensor(2.5))
    stop.on_step_end(args, state, control)
    assert stop.step is None and not control.should_training_stop  # a finite step: training goes on
    state.global_step = 2
    for loss in (1.5, float("nan"), 2.0):  # the micro-batches of one optimizer step: one of them is nan
        stop.observe(torch.tensor(loss))
    control.should_save = control.should_evaluate = True  # what the Trainer asks for at this step
    stop.on_step_end(args, state, control)
    assert stop.step == 2 and control.should_training_stop
    assert not control.should_save and not control.should_evaluate  # the last good checkpoint stays the newest
    control.should_save = True
    stop.on_epoch_end(args, state, control)
    assert not control.should_save

"""trainer_setup.py: the global batch in the words the training log and the model card share. The trainer itself is
tested where it trains: test_chat_template.py (masks), test_packing.py, test_precision.py, test_preference.py."""

import pytest

from trainer_setup import global_batch


@pytest.mark.parametrize(
    "processes, pairs, packing, words",
    [
        (1, False, True, "micro-batch 4 x accumulation 2 = 8 packed rows of up to 512 tokens"),
        (2, False, False, "micro-batch 4 x accumulation 2 x 2 processes = 16 examples"),
        (2, True, True, "micro-batch 4 x accumulation 2 x 2 processes = 16 preference pairs"),
    ],
)
def test_the_global_batch_in_words(processes, pairs, packing, words):
    assert global_batch(4, 2, processes, 4 * 2 * processes, pairs, packing, 512) == words

"""Training numerics that are easy to get silently wrong."""

import pytest
import torch
from datasets import Dataset

from adapter_utils import build_lora_config
from config import LoraArguments, ModelArguments, QuantizationArguments
from data_utils import Conversations
from model_utils import load_model
from train_settings import TrainingConfig
from trainer_setup import build_trainer
from training_examples import to_training_records

CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water for 9 minutes."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! What can I do for you today?"}],
]


def lora_gradients(tiny_phi, tokenizer, tmp_path, evaluate_first: bool, repack: bool = False):
    torch.manual_seed(0)
    model = load_model(ModelArguments(model_name_or_path=str(tiny_phi)), QuantizationArguments(load_in_4bit=True))
    records = Dataset.from_list(to_training_records(Conversations([{"messages": c} for c in CONVERSATIONS], "all")))
    args = TrainingConfig(
        output_dir=str(tmp_path), report_to="none", max_steps=1, per_device_eval_batch_size=2, packing=False
    )
    trainer = build_trainer(
        model,
        tokenizer,
        args,
        records,
        eval_dataset=records,
        peft_config=build_lora_config(LoraArguments(lora_r=8, lora_dropout=0.0), "phi"),
    )
    if repack:  # what bitsandbytes does by default, without our guard
        for module in trainer.model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    if evaluate_first:
        trainer.evaluate()
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    trainer.model.train()
    loss = trainer.model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


@pytest.mark.slow
def test_evaluating_before_a_training_step_leaves_its_gradients_unchanged(tiny_phi, tokenizer, tmp_path):
    loss, grads = lora_gradients(tiny_phi, tokenizer, tmp_path, evaluate_first=False)
    loss_after_eval, grads_after_eval = lora_gradients(tiny_phi, tokenizer, tmp_path, evaluate_first=True)
    assert grads.abs().sum() > 0
    assert loss_after_eval == loss
    assert torch.equal(grads_after_eval, grads)


def test_the_guard_is_needed_on_this_cpu(tiny_phi, tokenizer, tmp_path):
    from bitsandbytes.cextension import lib  # noqa: F401  (loads the CPU backend)
    from bitsandbytes.nn.modules import has_avx512bf16

    if torch.cuda.is_available() or not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    _, grads = lora_gradients(tiny_phi, tokenizer, tmp_path, evaluate_first=False)
    # The bug the guard prevents: after an evaluation the training step fails, or (seen on SmolLM2) silently
    # computes different gradients.
    try:
        _, grads_after_eval = lora_gradients(tiny_phi, tokenizer, tmp_path, evaluate_first=True, repack=True)
    except RuntimeError as e:
        assert "leaf Variable" in str(e)
    else:
        assert not torch.allclose(grads_after_eval, grads, atol=1e-6)

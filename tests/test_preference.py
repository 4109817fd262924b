"""Preference tuning on CPU: DPO (from an SFT adapter, whose copy is the reference) and ORPO (TRL 1.16's
trl.experimental), on oasst1's ranked pairs, in the same template as SFT, token for token."""

import json
import shlex
import signal
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import train
from config import ModelArguments, QuantizationArguments
from data_utils import SAMPLE, load_conversations
from model_utils import load_model
from train_settings import parse_train_args
from trainer_setup import build_trainer, global_batch_message
from training_examples import to_training_records

ROOT = Path(__file__).resolve().parents[1]
PAIR = {
    "prompt": [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water."},
        {"role": "user", "content": "For how long?"},
    ],
    "chosen": [{"role": "assistant", "content": "About 9 minutes."}],
    "rejected": [{"role": "assistant", "content": "Forever."}],
}
PROMPT_TEXT = "### Human: How do I boil an egg? ### Assistant: Put it in boiling water.<|endoftext|> ### Human: For how long? ### Assistant:"  # noqa: E501


def common_args(tiny_phi) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_phi), "--report_to", "none"]
    return args + ["--logging_steps", "1", "--final_report", "false", "--seed", "42"]


@pytest.fixture(scope="module")
def sft_adapter(tiny_phi, tmp_path_factory) -> Path:
    """4 SFT steps at a high learning rate: an adapter far enough from the base that a reference tells them apart."""
    out = tmp_path_factory.mktemp("pref-sft") / "model"
    train.main([*common_args(tiny_phi), "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "0.01"])
    return out


@pytest.fixture(scope="module")
def dpo_run(tiny_phi, sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("pref-dpo") / "model"
    args = [*common_args(tiny_phi), "--output_dir", str(out), "--method", "dpo", "--init_adapter", str(sft_adapter)]
    args += ["--max_steps", "4", "--save_steps", "2", "--learning_rate", "0.005"]
    trainer, _ = train.main(args)
    return trainer, out, args


def trainer_for(method: str, tiny_phi, tmp_path, tokenizer):
    training_args = parse_train_args(
        [*common_args(tiny_phi), "--output_dir", str(tmp_path), "--method", method, "--eval_strategy", "no"]
    )[-1]
    model = load_model(ModelArguments(str(tiny_phi)), QuantizationArguments())
    from adapter_utils import build_lora_config
    from config import LoraArguments

    lora = build_lora_config(LoraArguments(lora_r=4), model.config.model_type)
    return build_trainer(model, tokenizer, training_args, Dataset.from_list([PAIR]), peft_config=lora)


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]


def test_dpo_trains_on_the_template_tokens(tiny_phi, tokenizer, tmp_path):
    trainer = trainer_for("dpo", tiny_phi, tmp_path, tokenizer)
    assert global_batch_message(trainer).endswith(" preference pairs per optimizer step")  # not "examples"
    row = trainer.train_dataset[0]
    prompt = chat_ids(tokenizer, PAIR["prompt"], add_generation_prompt=True)
    assert tokenizer.decode(prompt) == PROMPT_TEXT
    assert row["prompt_ids"] == prompt
    assert tokenizer.decode(row["chosen_ids"]) == " About 9 minutes.<|endoftext|>"
    assert tokenizer.decode(row["rejected_ids"]) == " Forever.<|endoftext|>"
    # Token for token what SFT trains on: the prompt, then the reply and its EOS as the loss masks mark them.
    for side in ("chosen", "rejected"):
        sft = tokenizer.apply_chat_template(
            PAIR["prompt"] + PAIR[side], return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["prompt_ids"] + row[f"{side}_ids"] == sft["input_ids"]
        assert sft["assistant_masks"][len(prompt) :] == [1] * len(row[f"{side}_ids"])
        assert row[f"{side}_ids"][-1] == tokenizer.eos_token_id


def test_orpo_trains_on_the_template_tokens(tiny_phi, tokenizer, tmp_path):
    """Without workarounds.TemplateTokensInOrpo, ORPOTrainer puts the BOS (here <|endoftext|>) before the prompt."""
    row = trainer_for("orpo", tiny_phi, tmp_path, tokenizer).train_dataset[0]
    prompt = chat_ids(tokenizer, PAIR["prompt"], add_generation_prompt=True)
    assert row["prompt_input_ids"] == prompt
    for side in ("chosen", "rejected"):
        full = chat_ids(tokenizer, PAIR["prompt"] + PAIR[side])
        assert row[f"{side}_input_ids"] == full
        assert row[f"{side}_labels"] == [-100] * len(prompt) + full[len(prompt) :]
        assert row[f"{side}_attention_mask"] == [1] * len(full)
    assert tokenizer.decode(row["chosen_input_ids"]) == PROMPT_TEXT + " About 9 minutes.<|endoftext|>"


def test_orpo_lives_in_trl_experimental():
    """TRL 1.16 has no ORPO in its stable API; when it moves, this test and trainer_setup.method_trainer change."""
    import trl

    assert not hasattr(trl, "ORPOTrainer")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: F401


@pytest.mark.slow
def test_dpo_reference_is_the_sft_adapter(dpo_run, sft_adapter):
    trainer, out, _ = dpo_run
    logs = [e for e in trainer.state.log_history if "rewards/chosen" in e]
    # Step 1 is scored before any update: the policy is the SFT adapter, so against the SFT reference the rewards
    # (beta x the log-prob ratio) are zero but for float noise; against the base they would be beta x several nats
    # (the test below shows the SFT adapter moved the replies' log-probs that far from the base's).
    assert abs(logs[0]["rewards/chosen"]) < 1e-2 and abs(logs[0]["rewards/rejected"]) < 1e-2
    assert abs(logs[-1]["rewards/margins"]) > 1e-3  # and then DPO moves the policy away from it
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    # The checkpoints keep the frozen reference for --resume: still the SFT adapter, weight for weight.
    sft = load_file(sft_adapter / "adapter_model.safetensors")
    ref = load_file(out / "checkpoint-2" / "ref" / "adapter_model.safetensors")
    assert sft.keys() == ref.keys() and all(torch.equal(sft[k], ref[k]) for k in sft)
    # The result is the trained adapter alone, in float32, moved away from where it started.
    assert not (out / "ref").exists()
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == sft.keys() and all(w.dtype == torch.float32 for w in trained.values())
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)
    run = json.loads(json.dumps(__import__("yaml").safe_load((out / "run_config.yaml").read_text())))
    assert (run["method"], run["init_adapter"], run["policy"]) == ("dpo", str(sft_adapter), "best_vs_rest")


@pytest.mark.slow
def test_sft_adapter_moved_the_log_probs(tiny_phi, sft_adapter):
    """The premise of the test above: the SFT adapter scores the replies nats away from the base."""
    from adapter_utils import load_chat_model
    from scoring import reply_log_probs

    pairs = load_conversations(str(SAMPLE), policy="best_vs_rest")
    pairs.examples = pairs.examples[:4]
    model, tokenizer = load_chat_model(sft_adapter)
    tuned = reply_log_probs(model, tokenizer, pairs, 256)
    with model.disable_adapter():
        base = reply_log_probs(model, tokenizer, pairs, 256)
    shifts = [abs(t[0] - b[0]) for t, b in zip(tuned, base, strict=True)]
    assert sum(shifts) / len(shifts) > 1.0  # nats: x beta 0.1 = rewards far above the 1e-2 of the test above


@pytest.mark.slow
def test_a_dpo_report_scores_base_sft_and_dpo_and_the_reward_against_the_sft_adapter(dpo_run, sft_adapter, tmp_path):
    import shutil

    import yaml

    import report
    import scoring
    from adapter_utils import load_chat_model
    from config import DataArguments
    from model_card import summary

    _, out, _ = dpo_run
    folder = tmp_path / "model"  # a copy: the report writes its files beside the adapter other tests read
    shutil.copytree(out, folder)
    result = report.main(["--model_dir", str(folder), "--report_prompts", "2", "--report_max_new_tokens", "4"])
    preference = result["preference"]
    assert {"base", "sft", "tuned"} <= preference.keys() and preference["reward_against"] == "sft"
    # By hand: the DPO adapter against the SFT adapter it started from (DPO's reference), pair by pair.
    run = yaml.safe_load((folder / "run_config.yaml").read_text())
    pairs = report.held_out_pairs(report.settings(DataArguments, run), result["heldout_part"])
    model, tokenizer = load_chat_model(folder)
    tuned = scoring.reply_log_probs(model, tokenizer, pairs, run["max_length"])
    model.load_adapter(str(sft_adapter), adapter_name="sft")
    model.set_adapter("sft")
    start = scoring.reply_log_probs(model, tokenizer, pairs, run["max_length"])
    raised = [t[0] - s[0] > t[2] - s[2] for t, s in zip(tuned, start, strict=True) if t[1] and t[3]]
    assert len(raised) == preference["tuned"]["pairs_scored"] > 0
    assert preference["tuned"]["reward_accuracy"] == pytest.approx(sum(raised) / len(raised))
    accuracy = f"{preference['tuned']['reward_accuracy']:.1%}"
    assert f"(against the sft model) | | {accuracy} |" in (folder / "README.md").read_text()
    assert f"reward accuracy (tuned against sft) {accuracy}" in summary(result)


@pytest.mark.slow
def test_dpo_resumes_to_the_same_adapter(dpo_run, tmp_path):
    """Stopped after step 2 and resumed, DPO ends bit-identical to the run that went straight to step 4."""
    _, out, args = dpo_run
    resumed = tmp_path / "model"
    resumed_args = [a if a != str(out) else str(resumed) for a in args]
    train.main([*resumed_args, "--max_steps", "2"])
    train.main([*resumed_args, "--max_steps", "4", "--resume"])
    straight, again = (load_file(folder / "adapter_model.safetensors") for folder in (out, resumed))
    assert all(torch.equal(straight[k], again[k]) for k in straight)


@pytest.mark.slow
def test_ctrl_c_during_dpo_saves_a_checkpoint_that_resumes_to_the_same_adapter(dpo_run, tmp_path):
    """Ctrl-C in DPO goes through SFT's path: a checkpoint (with the reference copy), the command to continue, and
    that command ends with the adapter of the uninterrupted run."""
    from test_resume import start, wait_for

    from checkpoint_utils import checkpoint_step, is_complete_checkpoint, latest_checkpoint

    _, straight, args = dpo_run
    out, log = tmp_path / "model", tmp_path / "train.log"
    process = start([a if a != str(straight) else str(out) for a in args], log)
    wait_for(lambda: is_complete_checkpoint(out / "checkpoint-2"), process, log)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    output = log.read_text()
    stopped_at = latest_checkpoint(out)
    assert "Traceback" not in output and f"Stopped by SIGINT at step {checkpoint_step(stopped_at)}" in output
    assert 2 <= checkpoint_step(stopped_at) < 4 and (stopped_at / "ref").is_dir()
    command = shlex.split(output.split("Continue with:\n  python ")[1].splitlines()[0])
    assert command[0] == "train.py" and command[-1] == "--resume"
    train.main(command[1:])
    resumed, expected = (load_file(folder / "adapter_model.safetensors") for folder in (out, straight))
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_orpo_trains_from_the_base(tiny_phi, tmp_path):
    out = tmp_path / "model"
    args = [*common_args(tiny_phi), "--output_dir", str(out), "--method", "orpo", "--max_steps", "3"]
    trainer, result = train.main([*args, "--learning_rate", "0.005"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    weights = load_file(out / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(k.endswith("lora_B.weight") and w.abs().max() > 0 for k, w in weights.items())  # it trained


def test_pairs_for_dpo_are_the_exported_pairs():
    pairs = load_conversations(str(SAMPLE), policy="best_vs_rest")
    records = to_training_records(pairs)
    assert len(records) == 429 and records[0]["prompt"] == pairs.examples[0]["prompt"]

"""Every numeric setting has a range, checked before anything loads or is written.

One table: for each numeric field of every settings class (config.py's dataclasses, inference.py's and app.py's
arguments, and the fields train_settings.TrainingConfig declares, with a few SFTConfig fields users commonly set), a
value outside its range, given to the entry point that reads it, must end in one line, exit code 2, and an unchanged
working folder. A numeric field added without a row here fails test_the_table_covers_every_numeric_setting.
"""

import dataclasses
import types
import typing

import pytest

import app
import config
import inference
import train
from train_settings import TrainingConfig, parse_train_args

# SFTConfig fields that TrainingConfig does not redeclare but that users commonly set, checked with ours.
COMMON_TRAINING_FIELDS = {"num_train_epochs", "per_device_eval_batch_size", "eval_steps", "seed"}

ENTRY_POINTS = {
    "train": lambda flag: train.main(["--output_dir", "out", flag]),
    "inference": lambda flag: inference.main(["Hi", "--adapter", "model", flag]),
    "app": lambda flag: app.main([flag]),
}

# (class, field, entry point, value outside the range, the one-line error)
TABLE = [
    (config.LoraArguments, "lora_r", "train", "0", "--lora_r must be at least 1, got 0."),
    (config.LoraArguments, "lora_alpha", "train", "-16", "--lora_alpha must be above 0, got -16."),
    (config.LoraArguments, "lora_dropout", "train", "1", "--lora_dropout must be in [0, 1), got 1.0."),
    (config.LoraArguments, "lora_dropout", "train", "-0.1", "--lora_dropout must be in [0, 1), got -0.1."),
    (config.DataArguments, "eval_fraction", "train", "1", "--eval_fraction must be in [0, 1), got 1.0."),
    (config.DataArguments, "eval_fraction", "train", "nan", "--eval_fraction must be in [0, 1), got nan."),
    (
        config.DataArguments,
        "test_fraction",
        "train",
        "1",
        "--test_fraction must be in [0, 1) and leave trees to train on with --eval_fraction, got 1.0 and 0.0.",
    ),
    (config.ReportArguments, "report_prompts", "train", "0", "--report_prompts must be at least 1, got 0."),
    (
        config.ReportArguments,
        "report_max_new_tokens",
        "train",
        "0",
        "--report_max_new_tokens must be at least 1, got 0.",
    ),
    (
        config.ReportArguments,
        "report_repetition_penalty",
        "train",
        "0",
        "--report_repetition_penalty must be above 0 (1.0: none), got 0.0.",
    ),
    (
        config.ReportArguments,
        "report_examples",
        "train",
        "-1",
        "--report_examples must be 0 (none shown) or more, got -1.",
    ),
    (config.GenerationArguments, "max_new_tokens", "inference", "0", "--max-new-tokens must be at least 1."),
    (
        config.GenerationArguments,
        "temperature",
        "inference",
        "-0.5",
        "--temperature must be 0 (greedy) or more, got -0.5.",
    ),
    (config.GenerationArguments, "temperature", "app", "nan", "--temperature must be 0 (greedy) or more, got nan."),
    (config.GenerationArguments, "top_p", "inference", "0", "--top-p must be in (0, 1]; 1 keeps every token."),
    (config.GenerationArguments, "top_p", "app", "1.5", "--top-p must be in (0, 1]; 1 keeps every token."),
    (config.GenerationArguments, "top_k", "inference", "-1", "--top-k must be 0 (no limit) or more."),
    (
        config.GenerationArguments,
        "repetition_penalty",
        "inference",
        "0",
        "--repetition-penalty must be above 0; 1.0 means none.",
    ),
    (
        config.GenerationArguments,
        "repetition_penalty",
        "inference",
        "nan",
        "--repetition-penalty must be above 0; 1.0 means none.",
    ),
    (config.GenerationArguments, "seed", "inference", "-1", "--seed must be in [0, 2**32), got -1."),
    (inference.InferenceArguments, "batch_size", "inference", "0", "--batch-size must be at least 1."),
    (
        inference.InferenceArguments,
        "max_input_tokens",
        "inference",
        "0",
        "--max-input-tokens must be at least 1, got 0.",
    ),
    (app.AppArguments, "port", "app", "0", "--port must be in 1..65535, got 0."),
    (app.AppArguments, "port", "app", "65536", "--port must be in 1..65535, got 65536."),
    (app.AppArguments, "concurrency", "app", "0", "--concurrency must be at least 1."),
    (app.AppArguments, "queue_size", "app", "0", "--queue-size must be at least 1."),
    (app.AppArguments, "max_input_chars", "app", "0", "--max-input-chars must be at least 1."),
    (app.AppArguments, "stream_timeout", "app", "0", "--stream-timeout must be above 0 seconds, got 0.0."),
    (TrainingConfig, "learning_rate", "train", "0", "--learning_rate must be above 0, got 0.0."),
    (TrainingConfig, "learning_rate", "train", "nan", "--learning_rate must be above 0, got nan."),
    (TrainingConfig, "learning_rate", "train", "inf", "--learning_rate must be above 0, got inf."),
    (
        TrainingConfig,
        "max_steps",
        "train",
        "-5",
        "--max_steps must be at least 1, or -1 to train --num_train_epochs epochs, got -5.",
    ),
    (
        TrainingConfig,
        "max_steps",
        "train",
        "0",
        "--max_steps must be at least 1, or -1 to train --num_train_epochs epochs, got 0.",
    ),
    (TrainingConfig, "num_train_epochs", "train", "0", "--num_train_epochs must be above 0, got 0.0."),
    (
        TrainingConfig,
        "per_device_train_batch_size",
        "train",
        "0",
        "--per_device_train_batch_size must be at least 1, got 0.",
    ),
    (
        TrainingConfig,
        "per_device_eval_batch_size",
        "train",
        "0",
        "--per_device_eval_batch_size must be at least 1, got 0.",
    ),
    (
        TrainingConfig,
        "gradient_accumulation_steps",
        "train",
        "-2",
        "--gradient_accumulation_steps must be at least 1, got -2.",
    ),
    (TrainingConfig, "max_length", "train", "0", "--max_length must be at least 1 token, got 0."),
    (
        TrainingConfig,
        "warmup_steps",
        "train",
        "-0.1",
        "--warmup_steps must be a share of the steps in [0, 1) or a whole number of steps, got -0.1.",
    ),
    (
        TrainingConfig,
        "warmup_steps",
        "train",
        "2.5",
        "--warmup_steps must be a share of the steps in [0, 1) or a whole number of steps, got 2.5.",
    ),
    (TrainingConfig, "max_grad_norm", "train", "-1", "--max_grad_norm must be 0 (no clipping) or more, got -1.0."),
    (
        TrainingConfig,
        "save_steps",
        "train",
        "0",
        "--save_steps must be a whole number of steps, or a share of the steps in (0, 1), got 0.0.",
    ),
    (
        TrainingConfig,
        "logging_steps",
        "train",
        "-10",
        "--logging_steps must be a whole number of steps, or a share of the steps in (0, 1), got -10.0.",
    ),
    (
        TrainingConfig,
        "eval_steps",
        "train",
        "1.5",
        "--eval_steps must be a whole number of steps, or a share of the steps in (0, 1), got 1.5.",
    ),
    (
        TrainingConfig,
        "save_total_limit",
        "train",
        "-1",
        "--save_total_limit must be 0 (keep every checkpoint) or more, got -1.",
    ),
    (TrainingConfig, "beta", "train", "0", "--beta must be above 0, got 0.0."),
    (TrainingConfig, "beta", "train", "inf", "--beta must be above 0, got inf."),
    (TrainingConfig, "seed", "train", "-1", "--seed must be in [0, 2**32), got -1."),
    (TrainingConfig, "seed", "train", str(2**32), "--seed must be in [0, 2**32), got 4294967296."),
]


def is_numeric(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(is_numeric(option) for option in typing.get_args(annotation))
    return annotation in (int, float)


def numeric_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if f.init and is_numeric(hints[f.name])}


def settings_classes() -> list[type]:
    from_config = [
        value for value in vars(config).values() if dataclasses.is_dataclass(value) and value.__module__ == "config"
    ]
    return [*from_config, inference.InferenceArguments, app.AppArguments]


def test_the_table_covers_every_numeric_setting():
    expected = {(cls, name) for cls in settings_classes() for name in numeric_fields(cls)}
    own = set(TrainingConfig.__annotations__) & numeric_fields(TrainingConfig)  # the fields TrainingConfig declares
    expected |= {(TrainingConfig, name) for name in own | COMMON_TRAINING_FIELDS}
    assert {(cls, name) for cls, name, *_ in TABLE} == expected
    assert len(settings_classes()) == 9  # config.py's 7 classes, inference.py's and app.py's


@pytest.mark.parametrize(
    "cls, name, entry, value, message", TABLE, ids=[f"{row[0].__name__}.{row[1]}={row[3]}" for row in TABLE]
)
def test_a_value_outside_the_range_is_one_line_and_exit_2(
    cls, name, entry, value, message, tmp_path, monkeypatch, capsys, snapshot
):
    monkeypatch.chdir(tmp_path)
    flag = f"--{name}={value}"
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[entry](flag)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert snapshot(tmp_path) == {}


def test_a_yaml_value_outside_the_range_is_refused_the_same_way(tmp_path, monkeypatch, capsys, snapshot):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("max_steps: -5\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", "run.yaml", "--output_dir", "out"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --max_steps must be at least 1, or -1 to train --num_train_epochs epochs, got -5.\n"
    )
    assert snapshot(tmp_path) == before


def test_the_edges_of_each_range_are_accepted():
    edges = ["--max_steps", "-1", "--num_train_epochs", "0.5", "--warmup_steps", "0", "--max_grad_norm", "0"]
    edges += ["--save_total_limit", "0", "--save_steps", "0.25", "--logging_steps", "1", "--eval_steps", "3"]
    edges += ["--lora_dropout", "0", "--eval_fraction", "0", "--report_examples", "0", "--seed", str(2**32 - 1)]
    model, quant, lora, data, report, training = parse_train_args(edges)
    assert (training.max_steps, training.num_train_epochs, training.warmup_steps) == (-1, 0.5, 0)
    assert (training.max_grad_norm, training.save_total_limit, training.save_steps) == (0, 0, 0.25)
    assert (training.logging_steps, training.eval_steps, training.seed) == (1, 3, 2**32 - 1)
    assert (lora.lora_dropout, data.eval_fraction, report.report_examples) == (0, 0, 0)
    greedy = config.GenerationArguments(temperature=0, top_k=0, top_p=1, seed=0)
    assert greedy.generate_kwargs()["do_sample"] is False
    assert app.AppArguments(port=65535, stream_timeout=0.5).port == 65535

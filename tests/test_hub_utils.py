"""--push_to_hub (hub_utils.py): checked before anything loads, uploaded by train.py after the report,
never by the Trainer; with the Hub out of reach (a dead port on 127.0.0.1), one line and the run kept whole."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from huggingface_hub.utils import filter_repo_objects

import train
from hub_utils import NOT_UPLOADED

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--final_report", "false"], "error: --push_to_hub uploads the folder after the report: drop --final_report"),
        (["--hub_model_id", "me/two words"], "error: --hub_model_id 'me/two words' is not a Hub repository name: "),
        ([], "error: --push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it."),  # as in every test
    ],
)
def test_push_settings_that_cannot_work_stop_before_anything_loads(tiny_phi, tmp_path, capsys, flags, message):
    out = tmp_path / "model"
    args = [*TINY, "--model", str(tiny_phi), "--output_dir", str(out), "--push_to_hub", *flags]
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists()


def hub_env(tmp_path: Path, **variables) -> dict:
    """This process's environment with the Hub on (no HF_HUB_OFFLINE) and no stored token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0", **variables}


@pytest.mark.slow
def test_push_needs_a_token(tiny_phi, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "train.py", *TINY, "--model", str(tiny_phi), "--output_dir", str(out), "--push_to_hub"]
    result = subprocess.run(command, cwd=ROOT, env=hub_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or "
        "pass --hub_token."
    ]
    assert not out.exists()


@pytest.mark.slow
def test_an_unreachable_hub_costs_one_line_after_the_report_and_keeps_the_run(tiny_phi, tmp_path):
    out, dead = tmp_path / "model", f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [*TINY, "--model", str(tiny_phi), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"]
    args += ["--eval_steps", "2", "--report_to", "none", "--report_prompts", "1", "--report_max_new_tokens", "4"]
    args += ["--push_to_hub", "--hub_model_id", "me/tuned"]
    env = hub_env(tmp_path, HF_ENDPOINT=dead, HF_TOKEN="hf_not_a_real_token")
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )

    # Had the Trainer pushed on its own, it would have failed at once (it creates the repository before training)
    # or at the first checkpoint; the one failure is train.py's upload, after the report.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: could not upload {out} to the Hugging Face Hub as me/tuned (ConnectError: [Errno 111] Connection "
        f"refused); the run is complete in {out}, unchanged: upload it later with `hf upload me/tuned {out} . "
        "--exclude 'checkpoint-*' --exclude training_args.bin --exclude .train.lock`."
    ]
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    for name in ("adapter_model.safetensors", "chat_template.jinja", "generation_config.json", "eval.json"):
        assert name in files
    assert {"checkpoint-1", "checkpoint-2"} <= {path.name for path in out.glob("checkpoint-*")}
    # What the upload would send (huggingface_hub's own filter): the final adapter, its tokenizer with the portable
    # template and the model card with the figures, which names the repository; no checkpoint, no pickled settings.
    uploaded = set(filter_repo_objects(files, ignore_patterns=list(NOT_UPLOADED)))
    assert {"adapter_model.safetensors", "chat_template.jinja", "README.md", "eval.json", "loss.png"} <= uploaded
    assert not [name for name in uploaded if name.startswith("checkpoint-") or name.endswith((".bin", ".pt", ".pth"))]
    card = (out / "README.md").read_text()
    assert 'from_pretrained("me/tuned")' in card and "Held-out loss" in card

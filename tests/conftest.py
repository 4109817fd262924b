"""Shared fixtures: the bundled oasst1 sample and a tiny random model with Phi-2's architecture."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"  # screenshots of the browser tests (git-ignored)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sample_path() -> Path:
    from data_utils import SAMPLE

    return SAMPLE


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory) -> Path:
    """A random-weight PhiForCausalLM and a byte-level BPE tokenizer, saved like a Hub checkpoint."""
    from tiny_model import build_tiny_phi

    return build_tiny_phi(tmp_path_factory.mktemp("tiny-phi"))


@pytest.fixture(scope="session")
def tokenizer(tiny_phi):
    from model_utils import load_tokenizer

    return load_tokenizer(str(tiny_phi))


@pytest.fixture(scope="session")
def tiny_cpu_run(tiny_phi, tmp_path_factory):
    """configs/tiny_cpu.yaml for 4 steps on the real sample (10% of the trees held out), with the final report."""
    import train

    out = tmp_path_factory.mktemp("tiny-cpu") / "model"
    args = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_phi), "--output_dir", str(out)]
    args += ["--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--report_to", "tensorboard"]
    args += ["--report_prompts", "3", "--report_max_new_tokens", "8"]
    trainer, _ = train.main([*args, "--max_steps", "4"])
    return trainer, out, args


@pytest.fixture(scope="session")
def base_model(tiny_phi):
    """The tiny random base alone, float32 (model, tokenizer): greedy replies that depend on every prompt token."""
    from adapter_utils import load_chat_model
    from config import QuantizationArguments

    return load_chat_model(
        None, str(tiny_phi), QuantizationArguments(load_in_4bit=False, bnb_4bit_compute_dtype="float32")
    )


YES_QUESTIONS = [
    "What is the capital of France?",
    "Can you help me?",
    "Is water wet?",
    "Do cats purr?",
    "Is the sky blue?",
    "Can I learn Python?",
    "Are you a robot?",
    "Is it raining?",
]


@pytest.fixture(scope="session")
def yes_adapter(tiny_phi, tmp_path_factory) -> Path:
    """An adapter that answers every question with "Yes." and then EOS: replies the chat tests can check exactly.

    8 steps on an unquantized float32 base (a few seconds); the answer holds on the 4-bit base too."""
    import json

    import train

    folder = tmp_path_factory.mktemp("yes-adapter")
    data = folder / "yes.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}]}) + "\n"
            for q in YES_QUESTIONS
        )
    )
    out = folder / "model"
    args = ["--model", str(tiny_phi), "--dataset", str(data), "--output_dir", str(out), "--eval_split", ""]
    args += ["--max_steps", "8", "--learning_rate", "0.03", "--warmup_steps", "0", "--lora_r", "8"]
    args += ["--lora_dropout", "0", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    args += ["--load_in_4bit", "false", "--save_steps", "1000", "--final_report", "false", "--report_to", "none"]
    # Unpacked: these 8 steps were tuned on batches of 4 of the 8 examples. Packed, all 8 share one row and the same
    # 8 steps land elsewhere (greedy then starts with EOS). Packed training is covered by test_train and test_packing.
    args += ["--packing", "false"]
    train.main(args)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], ready_url: str, log: Path, env: dict | None = None):
    """Run a server command until the block ends, once `ready_url` answers 200; it is stopped however the block
    ends (killed if it does not stop within 30 s), and its output is in `log`."""
    import subprocess
    import time
    import urllib.request

    name = f"{Path(command[0]).name} {command[1]}"  # "python app.py", "transformers serve"
    with log.open("w") as log_file:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"{name} exited with {server.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer on {ready_url} within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def serve_app(args: list[str], log: Path):
    """app.py with these arguments on a free port, until the block ends; yields its URL once the page answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with running_server([sys.executable, "app.py", *args, "--port", str(port)], url, log, env):
        yield url


def chromium_path() -> str:
    """Debian's Chromium, or $CHROMIUM; the browser tests drive it through Playwright."""
    import shutil

    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = (
        "no Chromium for the browser test: apt-get install chromium (make test does it as root), or set $CHROMIUM"
    )
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI the set-up installs it: its absence is a broken set-up, not a skip
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download is not needed: the system Chromium speaks the same protocol.
        # --no-sandbox: Chromium's sandbox refuses to start as root, which is how CI runs.
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def chat_server(yes_adapter, tmp_path_factory):
    """app.py serving the "Yes." adapter on a free port (greedy, short replies), shared by the page tests."""
    args = ["--adapter", str(yes_adapter), "--load_in_4bit", "false", "--temperature", "0", "--max_new_tokens", "12"]
    with serve_app([*args, "--max_input_chars", "200"], tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


def folder_snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a hash of its bytes: equal snapshots mean nothing was written."""
    import hashlib

    return {
        str(path.relative_to(folder)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).rglob("*"))
    }


@pytest.fixture(scope="session")
def snapshot():
    return folder_snapshot

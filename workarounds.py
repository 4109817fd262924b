"""Every use of a library's private API, in one place (axolotl's `monkeypatch/` habit).

Each one names the version that needs it, the symptom it fixes, and the test that fails when upstream renames or
fixes it. Review this file when raising a version bound in requirements.txt. Heavy imports stay inside functions, so
`import workarounds` is free.
"""

import importlib.util
import sys
from pathlib import Path


def hf_argument_parser_class():
    """transformers 5.24: HfArgumentParser, loaded from its file (`transformers/hf_argparser.py`) without the package.

    Why: `import transformers` takes 1.5-2 s (huggingface_hub and its HTTP stack), which made `inference.py --help`
    and `app.py --help` slow; the parser's module needs only the standard library and yaml. If the file moves or gains
    imports, the normal import is used (slower, still correct).
    Test: tests/test_workarounds.py::test_argument_parser_loads_without_transformers."""
    if "transformers" not in sys.modules:
        package = importlib.util.find_spec("transformers")
        path = Path(package.origin).parent / "hf_argparser.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("_hf_argparser", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
                return module.HfArgumentParser
            except ImportError:
                pass
    from transformers import HfArgumentParser

    return HfArgumentParser


def cpu_has_bf16() -> bool:
    """torch 2.13: whether this CPU runs bf16 natively (AVX512-BF16 or AMX), through the private
    `torch.ops.mkldnn._is_mkldnn_bf16_supported` (torch has no public query; `torch.cpu` offers none).

    Why: bf16 training on a CPU without these instructions is emulated and slower than float32.
    Test: tests/test_workarounds.py::test_cpu_bf16_query_exists."""
    import torch

    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """bitsandbytes 0.50: turn off the CPU repack of 4-bit weights (`support_avx512bf16_for_cpu`, a module attribute).

    Symptom: on CPUs with AVX512-BF16 the first no-grad forward (an evaluation, a generate) repacks each 4-bit weight
    into an inference-only layout with no backward pass to the layer's input, so every later training step gets wrong
    LoRA gradients (a different loss; gradients off by 0.3 on a norm of 2.6), or crashes.
    Test: tests/test_correctness.py (gradients after an evaluation equal those without one; with the repack, not)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def skip_cpu_repack_where_it_fails(model) -> None:
    """bitsandbytes 0.50: turn off the CPU repack of 4-bit weights (`support_avx512bf16_for_cpu`, a module attribute)
    in the layers whose input size is not a multiple of their quantization block (64).

    Symptom: on CPUs with AVX512-BF16 the first no-grad forward (the report, inference) repacks each 4-bit weight and
    reshapes its scales to (outputs, inputs // 64): with 160 inputs (bench/gpu_phi2.py --tiny) it fails with "shape
    '[160, 2]' is invalid for input of size 400". Those layers keep bitsandbytes' plain kernel; the others repack.
    Test: tests/test_workarounds.py::test_the_cpu_repack_fails_on_inputs_not_a_multiple_of_the_block."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and module.in_features % module.weight.blocksize:
            module.support_avx512bf16_for_cpu = False


def attention_implementation(model) -> str:
    """transformers 5.24: the attention kernel a loaded model runs (`config._attn_implementation`, private; the public
    `attn_implementation` argument is not kept on the config).
    Test: tests/test_errors.py::test_flash_attention_on_cpu_falls_back_to_sdpa."""
    return model.config._attn_implementation


def attention_builds_packing_masks(model) -> bool:
    """transformers 5.24: whether the model's attention turns restarting position ids into per-example masks, judged
    by name (`masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`), for models whose weights are not there to test it (FSDP's
    meta device).
    Test: tests/test_workarounds.py::test_packing_mask_registry_knows_sdpa."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return attention_implementation(model) in ALL_MASK_ATTENTION_FUNCTIONS


class RestoreTrainableDtypesOnResume:
    """TRL 1.16 + peft 0.21 + transformers 5.24: keep the LoRA weights' dtype when --resume loads a checkpoint
    (overrides the Trainer's private `_load_from_checkpoint`; mix into the trainer class).

    Symptom: for a 4-bit base TRL trains the LoRA weights in bf16, but on resume the Trainer loads the adapter with
    peft's `load_adapter`, which upcasts it to float32 (`autocast_adapter_dtype=True`): the resumed run continues in
    another precision than the run it continues (final adapters 5.6e-4 apart after 3 steps).
    Test: tests/test_resume.py (a killed and resumed run ends bit-identical to an uninterrupted one)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])


class TemplateTokensInOrpo:
    """TRL 1.16 (trl.experimental.orpo): train ORPO on exactly the template's tokens (overrides ORPOTrainer's public
    `tokenize_row`, which calls the private `add_bos_token_if_needed`; mix into the trainer class).

    Symptom: ORPOTrainer puts the tokenizer's BOS token in front of every prompt that does not start with it, and our
    template renders none: SmolLM2 trained on "<|im_start|>### Human: ..." and Phi-2 on "<|endoftext|>### Human: ...",
    a token that SFT, DPO and inference never see there.
    Test: tests/test_preference.py::test_orpo_trains_on_the_template_tokens (the BOS is there without this)."""

    def tokenize_row(self, feature, model=None):
        row = super().tokenize_row(feature, model)
        bos = self.processing_class.bos_token_id
        rendered = self.processing_class(feature["prompt"], add_special_tokens=False)["input_ids"]
        if bos is not None and row["prompt_input_ids"][:1] == [bos] and rendered[:1] != [bos]:
            for key in list(row):
                if key.startswith(("prompt_", "chosen_", "rejected_")) and isinstance(row[key], list):
                    row[key] = row[key][1:]
        return row

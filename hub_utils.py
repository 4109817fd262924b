"""Share a finished run on the Hugging Face Hub (--push_to_hub): the output folder in one commit, after the report,
so that the repository holds the final adapter, the tokenizer with the portable chat template, the decoding settings
and the model card with its figures. The Trainer itself never pushes (trainer_setup.method_trainer).

What can be known before training is checked then (the repository name, a token, offline mode); a failed upload ends
in one line with the command that uploads the folder later, and every local file stays as it was.
"""

import logging
import shlex
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, httpx, validate_repo_id

from cli_utils import fail
from config import ConfigError
from model_utils import first_line
from run_lock import LOCK_FILE

logger = logging.getLogger(__name__)

# Never uploaded: the checkpoints (pickled optimizer and random states, for --resume only), the Trainer's pickled
# copy of the settings, which holds --hub_token when one was given, and the lock that the run holds while it uploads.
NOT_UPLOADED = ("checkpoint-*", "training_args.bin", LOCK_FILE)


def repo_name(args) -> str:
    """--hub_model_id, else the output folder's name under the token's account (the Trainer's rule)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def upload_command(args) -> str:
    """The huggingface_hub command that uploads the output folder as push_run does, for a later try by hand."""
    excluded = [part for pattern in NOT_UPLOADED for part in ("--exclude", pattern)]
    return shlex.join(["hf", "upload", repo_name(args), str(args.output_dir), ".", *excluded])


def check_push_settings(args, final_report: bool) -> None:
    """Before anything loads, what would make the upload after training fail for certain."""
    if not final_report:
        raise ConfigError(
            "--push_to_hub uploads the folder after the report: drop --final_report false, or run report.py later "
            "and upload with `hf upload`."
        )
    try:
        validate_repo_id(repo_name(args))
    except HFValidationError as e:
        raise ConfigError(f"--hub_model_id {repo_name(args)!r} is not a Hub repository name: {e}") from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it.")
    if not (args.hub_token or get_token()):
        raise ConfigError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or pass "
            "--hub_token."
        )


def push_run(args, reported: bool) -> str | None:
    """Upload the output folder to the Hub repository in one commit and return its URL; a network or Hub failure
    ends in one line (exit code 1) that says how to upload it later. A run without a report (FSDP, no held-out data)
    is not uploaded: its card would have no figures."""
    if not reported:
        logger.warning("No report, so no upload: run report.py, then `%s`.", upload_command(args))
        return None
    folder, repo_id = args.output_dir, repo_name(args)
    api = HfApi(token=args.hub_token)
    try:
        repo = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            revision=args.hub_revision,
            ignore_patterns=list(NOT_UPLOADED),
            commit_message="The adapter, its tokenizer and chat template, and the model card",
        )
    except (httpx.HTTPError, OSError) as e:  # no network, offline mode, the Hub's refusals (HfHubHTTPError)
        fail(
            f"could not upload {folder} to the Hugging Face Hub as {repo_id} ({type(e).__name__}: {first_line(e)}); "
            f"the run is complete in {folder}, unchanged: upload it later with `{upload_command(args)}`.",
            code=1,
        )
    logger.info("Uploaded %s to %s", folder, repo)
    return str(repo)

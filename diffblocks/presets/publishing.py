"""Push a preset pipeline to a Hugging Face Hub repository: save to a temporary folder, upload it as one commit."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from diffblocks.blocks import Pipeline
from diffblocks.presets.saving import save_pretrained
from diffblocks.presets.structure import preset_of

_MSG_OFFLINE = "push_to_hub needs the Hub, but offline mode is on (HF_HUB_OFFLINE); unset it to upload {repo_id!r}."
_MSG_PR_REVISION = (
    "create_pr=True opens a pull request against the default branch; revision={revision!r} cannot be combined "
    "with it. Push to the branch, or open the pull request without a revision."
)


def push_to_hub(
    pipe: Pipeline,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    **save_options: Any,
) -> CommitInfo:
    """Save ``pipe`` (see :func:`~diffblocks.presets.saving.save_pretrained`) and upload it to ``repo_id``.

    The repository is created if missing (``private`` applies only then), and a ``revision`` branch
    other than ``main`` is created from ``main`` if missing. The pipeline is saved before anything
    is sent, so a pipeline that cannot be saved creates no repository.

    Args:
        pipe: a preset pipeline.
        repo_id: ``"user/name"`` or ``"org/name"``.
        token: a Hub token; defaults to the locally stored one.
        private: visibility of a new repository.
        revision: the branch to commit to (default ``main``).
        commit_message: defaults to ``"Upload <family> pipeline with diffblocks"``.
        create_pr: open a pull request with the commit instead of committing to the branch.
        **save_options: ``variant``, ``max_shard_size``, ``copy_references`` (as ``save_pretrained``).

    Returns:
        The commit's info (``oid``, ``commit_url``, ``pr_url``).

    Raises:
        OfflineModeIsEnabled: ``HF_HUB_OFFLINE`` is set.
        ValueError: ``create_pr`` with a ``revision`` other than ``main``; or as ``save_pretrained``.
    """
    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(_MSG_OFFLINE.format(repo_id=repo_id))
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(_MSG_PR_REVISION.format(revision=revision))
    api = HfApi(token=token)  # built per call, so that it reads the endpoint (HF_ENDPOINT) in force now
    with tempfile.TemporaryDirectory(prefix="diffblocks-push-") as tmp:
        folder = save_pretrained(pipe, Path(tmp) / "pipeline", **save_options)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/"):
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        family = preset_of(pipe).family
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=os.fspath(folder),
            revision=revision,
            commit_message=commit_message or f"Upload {family} pipeline with diffblocks",
            create_pr=create_pr,
        )


__all__ = ["push_to_hub"]

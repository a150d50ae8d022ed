"""`tok1d export --push REPO`: an export folder uploaded to the Hugging Face hub with huggingface_hub.

The token comes from the environment (HF_TOKEN) or `hf auth login`'s stored token and never
reaches a message; the endpoint is huggingface_hub's, or HF_ENDPOINT as set when the push runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, get_token


def push_folder(directory: Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload the folder as one commit;
    returns the commit's URL."""
    token = get_token()
    if not token:
        raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login` before --push")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ValueError(f"--push {repo_id!r}: expected a repo id NAMESPACE/NAME, e.g. me/titok-fashion")
    # huggingface_hub reads HF_ENDPOINT once, on import; read here, it also holds in a long-lived process.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                               commit_message=f"tok1d export of {directory.name}")
    return str(commit.commit_url)

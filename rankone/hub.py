"""Publishing an export on the Hugging Face Hub: `rankone push`.

Both go through huggingface_hub: the token comes from where huggingface_hub keeps it
(`HF_TOKEN`, `hf auth login`), and is passed to it and nowhere else, never printed, never
written. Reading one back is `rankone.load("hf:ORG/NAME")` (methods/rankone/artifact.py).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import huggingface_hub.constants

from rankone.errors import RankoneError
from rankone.methods.artifact import CONFIG_FILE
from rankone.sources import HF_SCHEME, parse_hf


def _one_line(error: Exception, token: str | None) -> str:
    """An exception as one line, with the token (should a library ever echo it) blanked out."""
    text = (str(error).strip().splitlines() or [""])[0]
    if token:
        text = text.replace(token, "***")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def push(folder: Path, repo: str, *, private: bool = False, revision: str | None = None, token: str | None = None) -> str:
    """Upload an exported folder to the Hub repo `repo` (created if needed, on branch `revision`); returns its URL."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise RankoneError(f"{folder}: not an exported model (no {CONFIG_FILE}); run `rankone export --out {folder}` first")
    parse_hf(HF_SCHEME + repo)  # ORG/NAME, or one line saying so
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise RankoneError(f"--repo {repo}: cannot push while HF_HUB_OFFLINE is set")
    token = token or huggingface_hub.get_token()
    if not token:
        raise RankoneError("push: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN")
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision,
                          commit_message=f"rankone push of {folder.name}")
    except Exception as error:  # huggingface_hub raises HTTP, connection and auth errors of many types
        raise RankoneError(f"--repo {repo}: push failed ({_one_line(error, token)})") from None
    return f"{url}/tree/{revision}" if revision else str(url)

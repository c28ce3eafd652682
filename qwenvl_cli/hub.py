"""Model resolution: a local checkpoint directory, or a hub id fetched through huggingface_hub's cache.

Order: --model, then $QWENVL_MODEL, then the default. A hub download shows huggingface_hub's progress on
stderr and honours HF_HUB_OFFLINE; without network or cache the error says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qwenvl_cli.errors import ModelError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
KNOWN_MODELS = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-32B-Instruct",
    "Qwen/Qwen2.5-VL-72B-Instruct",
)
# Only what the engine reads: no pickles, no remote code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]


def model_reference(option: str | None) -> str:
    return option or os.environ.get("QWENVL_MODEL") or DEFAULT_MODEL


def _looks_like_path(ref: str) -> bool:
    """Hub ids are exactly `owner/name`; anything else names a local directory."""
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1


def resolve_model(ref: str) -> Path:
    """A directory for `ref`, downloading a hub id when needed."""
    path = Path(ref).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:  # a name too long, a permission denied on the way: not the ENOENT kind
        raise ModelError(f"{ref}: cannot read ({exc.strerror or exc})") from exc
    if is_dir:
        return path
    if exists:
        raise ModelError(f"{ref}: not a directory (pass a checkpoint directory or a hub id like {DEFAULT_MODEL})")
    if _looks_like_path(ref):
        raise ModelError(f"{ref}: model directory not found")
    return _download(ref)


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_bytes: int
    path: Path | None  # the newest snapshot directory


def cached_models() -> dict[str, CachedModel]:
    """Qwen2.5-VL repositories present in the local Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return {}
    found = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified)
        path = Path(revisions[-1].snapshot_path) if revisions else None
        found[repo.repo_id] = CachedModel(repo.repo_id, repo.size_on_disk, path)
    return found


def download(repo_id: str) -> Path:
    """Fetch (or finish fetching: downloads resume) a hub model; progress goes to stderr."""
    return _download(repo_id)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"{repo_id}: not in the local Hugging Face cache and it cannot be downloaded (offline or no network); "
            f"connect and retry, or pass --model DIR with a local checkpoint"
        ) from exc
    except HFValidationError as exc:  # not owner/name in the characters and length the hub allows
        raise ModelError(
            f"{repo_id}: no such model directory, and not a valid hub id (like {DEFAULT_MODEL})"
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a login)") from exc
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{repo_id}: download failed ({first}); pass --model DIR to use a local checkpoint") from exc

"""Fail in one line, within seconds, when a model is neither in the local cache nor downloadable.

huggingface_hub retries an unreachable hub for about a minute and then raises a chain of
tracebacks; a cluster without internet hits that at every model load. Before loading pretrained
weights the build (and ``--online``, ``irepa-sample``) asks :func:`require_available`: is the file
in the local hub / torch-hub cache, and if not, can the hub be reached at all (``HF_HUB_OFFLINE``,
then a short TCP connect to the endpoint)? If neither, the error names the model and the flags
that work offline.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

__all__ = ["ModelUnavailable", "hub_reachable", "hf_cached", "require_available"]

_REACHABLE: dict[str, bool] = {}


class ModelUnavailable(ValueError):
    """Pretrained weights that are neither cached locally nor downloadable from here."""


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(url: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT`` or huggingface.co) accepts a TCP connection
    (False at once with ``HF_HUB_OFFLINE=1``); remembered per endpoint for the process."""
    if _offline_env():
        return False
    url = url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if url not in _REACHABLE:
        u = urlparse(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((u.hostname or "huggingface.co", port), timeout=timeout):
                _REACHABLE[url] = True
        except OSError:
            _REACHABLE[url] = False
    return _REACHABLE[url]


def hf_cached(repo_id: str, filenames: Iterable[str]) -> bool:
    """Whether any of ``filenames`` of hub repo ``repo_id`` is in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        got = try_to_load_from_cache(repo_id, name)
        if isinstance(got, str) and Path(got).is_file():
            return True
    return False


def torch_hub_cached(url: str) -> bool:
    """Whether a URL download of torch.hub (``load_state_dict_from_url``) is in its cache."""
    import torch

    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()


def require_available(what: str, cached: bool, offline_flags: str) -> None:
    """Raise :class:`ModelUnavailable` (one line) when ``what`` is not ``cached`` and the hub
    cannot be reached; ``offline_flags`` says what works without the hub."""
    if cached or hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if _offline_env() else "the hub cannot be reached from here"
    raise ModelUnavailable(f"{what} is not in the local cache and {why}: download it on a connected machine "
                           f"(the same command fills the cache), or {offline_flags}")

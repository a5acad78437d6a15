"""Store backends behind one interface (`base.Backend`): zarr (random access) and webdataset (streams).

`get_backend(format)` is the only place that maps a manifest's `format` to code; everything else
asks the backend (or `StoreReader.loader_kind` / `random_access`) what it can do.
"""

from __future__ import annotations

from ..errors import StoreError
from .base import ON_DAMAGE, Backend, check_on_damage
from .members import group_members, member_key, split_member_name
from .wds import WdsBackend
from .zarr import ZarrBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (ZarrBackend(), WdsBackend())}


def get_backend(format: str) -> Backend:
    """The backend of a store format ("zarr" or "wds")."""
    try:
        return BACKENDS[format]
    except KeyError:
        raise StoreError(f"unknown store format {format!r}; this irepa knows {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "Backend", "ON_DAMAGE", "check_on_damage", "get_backend", "group_members", "member_key",
           "split_member_name"]

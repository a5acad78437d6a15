"""The interface every store backend implements (zarr, webdataset).

A backend owns the bytes of a store's arrays: how they are laid out in files, written atomically
per shard, cleaned, read back (random access or shard iteration) and listed for `verify`. The rest
of the package (writer, reader, report, repair) and everything outside `stores/` talk to a store
through this interface and the reader's `loader_kind` / `random_access`, never through the format
name. A new backend is one module here plus one entry in `backends.BACKENDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..layout import StoreLayout

ON_DAMAGE = ("raise", "skip")


def check_on_damage(on_damage: str) -> str:
    """Validate an `on_damage` argument ("raise": stop with a one-line error; "skip": leave the
    damaged sample out and record its message)."""
    if on_damage not in ON_DAMAGE:
        raise ValueError(f"on_damage must be one of {ON_DAMAGE}, got {on_damage!r}")
    return on_damage


class Backend(ABC):
    """What a store format provides. Instances are stateless; per-store state lives in readers."""

    name: ClassVar[str]
    #: the trainer's loader for this backend: "index" (random access, one get_batch per
    #: micro-batch, a random permutation per epoch) or "stream" (shards in a shuffled order
    #: through a shuffle buffer)
    loader_kind: ClassVar[str]
    #: whether `StoreReader.get_batch` (reads of arbitrary rows) works
    random_access: ClassVar[bool]
    #: codecs this backend can store the `pixels` array with ("none": raw rows, always first)
    pixel_codecs: ClassVar[tuple[str, ...]] = ("none",)

    # ------------------------------------------------------------------ writing

    @abstractmethod
    def create(self, root: Path, layout: StoreLayout, format_version: int) -> list[str]:
        """Create what the store needs before any shard (idempotent); return the relative paths
        of metadata files to checksum in the manifest (`meta_files`)."""

    @abstractmethod
    def write_shard(self, root: Path, layout: StoreLayout, shard: int, rows: range, data: dict[str, np.ndarray],
                    valid: np.ndarray, members: dict[str, str], format_version: int) -> dict[str, str]:
        """Write one shard atomically (temporary name, fsync, rename); return {relpath: sha256}
        of the files written (a file the format leaves out, e.g. all fill values, is not listed)."""

    @abstractmethod
    def clean_shard(self, root: Path, layout: StoreLayout, shard: int) -> None:
        """Remove a shard's files and any temporaries an interrupted write of it left."""

    # ------------------------------------------------------------------ verify-side listing

    @abstractmethod
    def shard_of_file(self, rel: str, layout_arrays: dict[str, Any], num_shards: int) -> int | None:
        """The shard a data file (relative path) may belong to, or None when no shard of this
        store can have such a file (a stray). `layout_arrays` is the manifest's `arrays`."""

    @abstractmethod
    def array_bytes(self, root: Path, manifest: dict) -> dict[str, int]:
        """Bytes on disk of each array of a store ({array name: bytes}, container overhead such
        as tar headers included in the array's share; what no array owns under "other")."""

    @abstractmethod
    def read_checks(self, format_version: int) -> list[str]:
        """What a reader checks on every read of a store of this format version (for inspect)."""

    # ------------------------------------------------------------------ reading

    @abstractmethod
    def open_reader(self, root: Path, manifest: dict, listed: set[str], checks: bool) -> Any:
        """Per-store read state (opened lazily per process; must pickle for DataLoader workers).
        `listed`: relative paths of every data file the manifest (or the completion records of
        finished shards) lists; a listed file that is missing is an error. `checks`: verify
        checksums on read (False only for benchmarks of the checks' cost)."""

"""Refuse a store that cannot train the requested model, before step 0.

Every refusal names the store, what it holds and what the model needs: an unfinished build, a
failed checksum (``--verify``), a latent channel count or latent size the model was not built for,
an encoder token grid that differs from the SiT patch grid (latent h / patch), a missing encoder or
a feature dim that differs from the projector's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from irepa.stores import StoreError

__all__ = ["StoreMismatchError", "ModelNeeds", "check_store_state", "check_store", "verify"]


class StoreMismatchError(StoreError):
    """The store is readable but does not fit the run."""


@dataclass(frozen=True)
class ModelNeeds:
    """What the SiT expects from a store."""

    name: str
    in_channels: int
    input_size: tuple[int, int]
    patch_size: int
    encoders: Sequence[str] = ()
    z_dims: Sequence[int] = ()
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    def describe(self) -> str:
        h, w = self.input_size
        gh, gw = self.grid
        return (f"model {self.name} needs latents with {self.in_channels} channels at {h}x{w} and a "
                f"{gh}x{gw} token grid ({h}x{w} latent / patch {self.patch_size})")


def _manifest_state(manifest: dict) -> str:
    return str(manifest.get("state", "unknown"))


def check_store_state(path: str | Path, manifest: dict) -> None:
    """A store whose build has not finished is refused (the reader would see holes)."""
    state = _manifest_state(manifest)
    if state != "complete":
        shards = manifest.get("shards") or []
        total = manifest.get("num_shards", len(shards))
        raise StoreMismatchError(
            f"store {path} is unfinished (state {state!r}, {len(shards)} of {total} shards recorded); "
            "rerun the same `irepa-cache build` command to resume it before training")


def verify(path: str | Path) -> None:
    """Recompute every shard checksum (``stores.verify_store`` via ``open_store(verify_checksums=True)``);
    a mismatch raises ``StoreError`` naming the store and the bad shard."""
    from irepa.stores import open_store

    try:
        open_store(path, verify_checksums=True)
    except StoreError as e:
        raise StoreMismatchError(f"store {path} failed --verify: {e}") from e


def _grids(reader: Any) -> dict[str, tuple[int, int]]:
    grids = getattr(reader, "token_grids", None)
    if grids:
        return {e: tuple(int(v) for v in g) for e, g in grids.items()}
    return {e: tuple(reader.token_grid) for e in reader.encoders}


def _holds(reader: Any) -> str:
    c2, h, w = reader.latent_shape
    grids = _grids(reader)
    enc = ", ".join(f"{e} (token grid {grids[e][0]}x{grids[e][1]}, dim {reader.feature_dims[e]})"
                    for e in reader.encoders) or "no encoder features"
    return f"holds latents [{c2}, {h}, {w}] ({c2 // 2} channels at {h}x{w}, mean+std) and encoders: {enc}"


def check_store(reader: Any, needs: ModelNeeds) -> None:
    """Raise :class:`StoreMismatchError` when the opened store ``reader`` does not fit ``needs``."""
    path = reader.path
    check_store_state(path, reader.manifest)
    problems: list[str] = []
    c2, h, w = reader.latent_shape
    if c2 // 2 != needs.in_channels:
        problems.append(f"latent channel count {c2 // 2} != {needs.in_channels}")
    if (h, w) != tuple(needs.input_size):
        problems.append(f"latent size {h}x{w} != {needs.input_size[0]}x{needs.input_size[1]}")
    if needs.encoders:
        missing = [e for e in needs.encoders if e not in reader.encoders]
        if missing:
            problems.append(f"encoder(s) {missing} not in the store (it has {list(reader.encoders)})")
        grids = _grids(reader)
        for e in needs.encoders:
            g = grids.get(e)
            if g is not None and g != needs.grid:
                problems.append(f"encoder {e} token grid {g[0]}x{g[1]} != the model's patch grid "
                                f"{needs.grid[0]}x{needs.grid[1]}")
        for e, z in zip(needs.encoders, needs.z_dims):
            if e in reader.feature_dims and int(reader.feature_dims[e]) != int(z):
                problems.append(f"encoder {e} feature dim {reader.feature_dims[e]} != projector dim {z}")
    if needs.num_classes is not None:
        nc = (reader.manifest.get("dataset") or {}).get("num_classes")
        if nc is not None and int(nc) > needs.num_classes:
            problems.append(f"{nc} classes > the model's {needs.num_classes}")
    if problems:
        raise StoreMismatchError(
            f"store {path} does not fit the model: {'; '.join(problems)}. The store {_holds(reader)}; "
            f"{needs.describe()}.")

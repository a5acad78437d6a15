"""irepa's on-disk store format (version 2) as a library: zarr v3 and webdataset backends.

Depends on numpy, zarr, tarfile/webdataset and the standard library only (no torch at import).
See docs/ARCHITECTURE.md for the interface. Choices the design leaves open, made here:

- zarr payload arrays (latents, features, scales, cls) are stored uncompressed: float
  activations barely compress and decompression would cost the loader CPU. labels/keys use zstd.
- Sample index i is the i-th valid row; skipped inputs keep their row (zeros, label -1) in zarr
  and are absent from webdataset tars.
- latent_stats (per channel, of z = mean + std * eps) are computed over the unflipped latents of
  the valid rows, in float64, from per-shard sums kept in the shard completion records.
- A resumed build keeps the build_args and package_version of the run that started the store,
  so the finished store is byte-identical to an uninterrupted build.
- A `--latents-from` store records the latents store's path relative to itself; readers check
  its dataset fingerprint, row count, shard size and resolution before using it.
- Source keys that are not valid UTF-8 (file names os.listdir returns with surrogate escapes)
  are stored with each undecodable byte written as \\xNN (`manifest.escape_key`); the dataset
  fingerprint is the sha256 of the escaped keys.

Format version 2 (written since the read-time checksums): every byte a reader hands out is
covered by a checksum it checks on read. zarr: a crc32c after every row (zarr's `crc32c` codec,
which zarr-python and tensorstore check too), the shard index's crc32c, a crc32c on the
labels/keys chunks. webdataset: a `<key>.crc32c.json` member per sample with the crc32c of every
other member. Completion records carry the id of the build that wrote them (`build`), so a lost
manifest can be rebuilt from them (`repair_store`, `StoreWriter.open`). A file the manifest lists
is never read as fill values. Version 1 stores keep opening and are checked as far as their
format allows (zarr shard indexes, tar headers); `describe_store(...)["read_checks"]` and
`irepa-cache inspect` say which checks a store gets. Damage is a one-line `DamagedData` naming
the store, array or member, row and file; readers and the trainer's loader take
`on_damage="skip"` to leave damaged samples out and report them instead.

Pixel stores (`irepa-cache build --pixels`): a `pixels` uint8 [N, 3, H, W] array, the exact ADM
crop the encoders saw, channels first (what readers return and encoders take, so raw rows are read
straight into a batch), stored once: readers mirror it for a flipped view. `--vae none` makes a
pixel-only store (no latents; manifest `vae`/`latent_shape` null). The manifest's `pixels` entry
(present only on pixel stores, so other manifests are unchanged) names the codec: "none" (raw rows,
the default: bench.storage measured that a codec costs the loader more than it saves), "zstd"
(zarr's codec per row) or "png" (one PNG member per webdataset sample). Nothing older stores hold
changed, so pixel stores are format version 2 as well.

A build holds `<store>/build.lock` (`StoreLock`): a second build on the same store fails at
once naming the first; a lock left by a dead process is taken over with a message.
"""

from .backends import BACKENDS, Backend, get_backend, group_members, split_member_name
from .errors import DamagedData, StoreError, one_line
from .layout import StoreLayout, dequantize_int8, quantize_int8
from .lock import StoreLock
from .manifest import FORMAT_VERSION, READ_VERSIONS, dataset_fingerprint, escape_key, read_manifest
from .reader import StoreReader, open_store
from .repair import relink_latents, repair_store
from .report import VerifyReport, array_bytes, describe_store, find_strays, format_description, verify_store
from .writer import StoreWriter, reopen_shards

__all__ = [
    "BACKENDS",
    "Backend",
    "array_bytes",
    "DamagedData",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "StoreError",
    "StoreLayout",
    "StoreLock",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "dataset_fingerprint",
    "dequantize_int8",
    "describe_store",
    "escape_key",
    "find_strays",
    "format_description",
    "get_backend",
    "group_members",
    "one_line",
    "open_store",
    "quantize_int8",
    "read_manifest",
    "reopen_shards",
    "relink_latents",
    "repair_store",
    "split_member_name",
    "verify_store",
]

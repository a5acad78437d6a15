"""irepa's on-disk store format (version 1) as a library: zarr v3 and webdataset backends.

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
"""

from .errors import StoreError
from .layout import StoreLayout, dequantize_int8, quantize_int8
from .manifest import FORMAT_VERSION, dataset_fingerprint, read_manifest
from .reader import StoreReader, open_store
from .report import VerifyReport, describe_store, format_description, verify_store
from .writer import StoreWriter, reopen_shards

__all__ = [
    "FORMAT_VERSION",
    "StoreError",
    "StoreLayout",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "dataset_fingerprint",
    "dequantize_int8",
    "describe_store",
    "format_description",
    "open_store",
    "quantize_int8",
    "read_manifest",
    "reopen_shards",
    "verify_store",
]

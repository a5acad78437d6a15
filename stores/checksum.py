"""crc32c (Castagnoli), the one checksum every store check uses (zarr's crc32c codec and shard
index, the webdataset `<key>.crc32c.json` members), computed by zarr's own dependency
google-crc32c (hardware CRC instructions where the CPU has them).

`crc32c(data, value)` takes any contiguous bytes-like object (bytes, memoryview, numpy array) and
continues from `value` (the crc of the bytes before `data`; 0 to start).
"""

from __future__ import annotations

from typing import Any

import google_crc32c as _g
import numpy as np

__all__ = ["crc32c", "IMPLEMENTATION"]

#: which code computes it ("c" when google-crc32c's C extension is in use)
IMPLEMENTATION = f"google_crc32c ({_g.implementation})"


def crc32c(data: Any, value: int = 0) -> int:
    """The crc32c of `data`, continued from `value`."""
    if isinstance(data, memoryview):  # google-crc32c takes arrays and bytes but no writable memoryview
        data = np.frombuffer(data, dtype=np.uint8)
    return _g.extend(value, data) if value else _g.value(data)

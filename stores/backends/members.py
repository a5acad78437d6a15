"""The one grouper of tar members into webdataset samples, used by every tar reader of irepa.

webdataset's rule: a member "dir/base.ext.more" belongs to the sample whose key is "dir/base"
(everything before the first dot of the file name) and is stored under the suffix "ext.more";
consecutive members with the same key form one sample. The store's own tars, webdataset image
sources (`pipeline.sources`) and streamed shards all go through `group_members`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, TypeVar

from ..errors import StoreError

T = TypeVar("T")
_SPLIT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a tar member name by webdataset's rule; None when the file name has no dot
    ("a/b.seg.png" -> ("a/b", "seg.png"))."""
    m = _SPLIT.match(name)
    return (m.group(1), m.group(2)) if m else None


def group_members(entries: Iterable[tuple[str, T]], where: str, *, skip_unnamed: bool = False,
                  lower_suffix: bool = False,
                  error: Callable[[str], Exception] = StoreError) -> Iterator[tuple[str, dict[str, T]]]:
    """Group (member name, payload) pairs, in archive order, into (key, {suffix: payload}).

    A member name without a '<key>.<suffix>' form raises `error` naming it (or is passed over
    with skip_unnamed, as webdataset does); so does a suffix seen twice in one sample, or a key
    that comes back after another sample started (its members would be split in two samples).
    `lower_suffix` lowercases suffixes (image extensions of a source: ".JPG" is "jpg").
    Payloads are passed through untouched, so a reader decides what it reads and when.
    """
    cur_key: str | None = None
    cur: dict[str, T] = {}
    seen: set[str] = set()
    for name, payload in entries:
        split = split_member_name(name)
        if split is None:
            if skip_unnamed:
                continue
            raise error(f"{where}: member {name!r} has no '<key>.<suffix>' form")
        key, suffix = split
        if lower_suffix:
            suffix = suffix.lower()
        if key != cur_key:
            if cur_key is not None:
                yield cur_key, cur
            if key in seen:
                raise error(f"{where}: member {name!r} belongs to sample {key!r}, which ended earlier in the "
                            "archive (a sample's members must be consecutive)")
            seen.add(key)
            cur_key, cur = key, {}
        if suffix in cur:
            raise error(f"{where}: duplicate member {name!r}")
        cur[suffix] = payload
    if cur_key is not None:
        yield cur_key, cur


def member_key(name: str) -> str | None:
    """The sample key of a member name (None without a '<key>.<suffix>' form)."""
    split = split_member_name(name)
    return split[0] if split else None


__all__ = ["group_members", "member_key", "split_member_name"]

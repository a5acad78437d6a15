"""Image sources for the build: an ImageFolder tree, webdataset tar shards, or a file list.

Every source enumerates its samples once, in a fixed order, and that position is the store row
(docs/ARCHITECTURE.md, "Rows, samples and skipped inputs"). A source only lists and reads raw
bytes; decoding happens later in ``pipeline.transforms`` so that undecodable files keep their
row and are skipped with a reason by the build. Common interface::

    src.keys         list[str], unique per source (duplicates raise SourceError naming them)
    src.labels       list[int], class index per row
    src.class_names  list[str], index -> name
    len(src)         number of rows
    src.read_bytes(row) -> bytes
    src.describe()   JSON-able provenance dict (type, location, counts)

Unlabelled inputs (a file list without labels, tars without ``cls``) get label 0 and the single
class name "unlabeled".

Keys are text. A file name whose bytes are not UTF-8 (``os.listdir`` returns it with surrogate
escapes) keeps its row and is read by its real name; its key has each undecodable byte written
as ``\\xNN`` (``irepa.stores.escape_key``: Latin-1 "café.png" -> ``caf\\xe9.png``), and every
message about it names it that way.
"""
from __future__ import annotations

import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from irepa.stores import escape_key, group_members

__all__ = [
    "SourceError",
    "IMG_EXTENSIONS",
    "ImageFolderSource",
    "WebDatasetSource",
    "FileListSource",
    "open_source",
    "default_sample_source",
    "expand_urls",
    "SAMPLE_IMAGES",
]

# torchvision.datasets.folder.IMG_EXTENSIONS; matched case-insensitively (".JPEG" included).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Image member extensions in a webdataset sample, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "img")
UNLABELED = "unlabeled"
SAMPLE_IMAGES = Path(__file__).resolve().parent / "assets" / "sample_images"


class SourceError(ValueError):
    """A data source that cannot be enumerated (names the source and the problem)."""


def _check_unique(keys: Sequence[str], where: str) -> None:
    if len(set(keys)) != len(keys):
        dups = [k for k, n in Counter(keys).items() if n > 1]
        shown = ", ".join(repr(k) for k in dups[:10])
        more = f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""
        raise SourceError(f"{where}: {len(dups)} duplicate sample keys: {shown}{more}")


def _int_label_names(labels: Sequence[int]) -> list[str]:
    return [str(i) for i in range(max(labels) + 1)] if labels else []


class _FileSource:
    """A source whose row ``r`` is the file ``paths[r]`` with key ``keys[r]``."""

    paths: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, row: int) -> bytes:
        """Raw file bytes of ``row``. A file that cannot be read (missing, a broken symbolic link,
        no permission) is not a data error: SourceError names it and the build stops."""
        path = self.paths[row]
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            shown = escape_key(path)
            if os.path.islink(path) and not os.path.exists(path):
                why = f"it is a broken symbolic link to {escape_key(os.readlink(path))}"
            else:
                why = f"{e.strerror or type(e).__name__}"
            raise SourceError(f"source file {shown} (row {row}, key {self.keys[row]!r}) cannot be read: {why}") from None


class ImageFolderSource(_FileSource):
    """``root/<class>/**/<file>``, enumerated exactly like ``torchvision.datasets.ImageFolder``.

    Classes are the sorted sub-directory names of ``root`` (label = position); files come from
    ``sorted(os.walk(class_dir, followlinks=True))`` with sorted file names, kept when their
    lower-cased name ends with one of ``IMG_EXTENSIONS``. Keys are POSIX paths relative to root
    ("n01440764/n01440764_10026.JPEG"). Files are not opened here: undecodable ones are skipped
    later by the build with a reason.
    """

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"ImageFolder {self.root}: not a directory")
        exts = tuple(e.lower() for e in extensions)
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.class_names:
            raise SourceError(f"ImageFolder {self.root}: no class sub-directories found")
        self.class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        self.paths: list[str] = []
        self.labels: list[int] = []
        empty: list[str] = []
        for cls_name in self.class_names:
            n_before = len(self.paths)
            for dirpath, _, fnames in sorted(os.walk(self.root / cls_name, followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(exts):
                        self.paths.append(os.path.join(dirpath, fname))
                        self.labels.append(self.class_to_idx[cls_name])
            if len(self.paths) == n_before:
                empty.append(cls_name)
        if empty:
            raise SourceError(
                f"ImageFolder {self.root}: no image files (extensions {', '.join(exts)}) in "
                f"class folder(s) {', '.join(empty[:10])}"
            )
        root_s = str(self.root)
        self.keys = [escape_key(os.path.relpath(p, root_s).replace(os.sep, "/")) for p in self.paths]
        _check_unique(self.keys, f"ImageFolder {self.root}")

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "root": str(self.root), "num_samples": len(self),
                "num_classes": len(self.class_names)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images, {len(self.class_names)} classes)"


_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand shard specs like webdataset: ``::`` separates patterns, ``{000..099}`` ranges
    (zero padding kept) and ``{a,b}`` lists expand via ``braceexpand``."""
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            if part:
                out.extend(braceexpand(part))
    return out


class WebDatasetSource:
    """Local, uncompressed webdataset tar shards (``images-{0000..0099}.tar``).

    Members are grouped into samples by webdataset's rule (consecutive members sharing the
    key = member path before the first dot of its file name; ``irepa.stores.group_members``). Each sample needs one image
    member (extension in ``WDS_IMAGE_EXTS``, first in that order wins) and may have ``cls``
    (an integer label as text). Keys are the ``__key__`` values; rows follow shard order then
    member order. An index (shard, byte offset, size) is built once by reading the tar
    headers, so ``read_bytes(row)`` is a single positional read (``os.pread``), safe in
    DataLoader workers (file handles are reopened per process).
    """

    kind = "webdataset"

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike]):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise SourceError(f"webdataset source {urls!r}: the pattern expands to no shards")
        self.shards: list[str] = []
        for url in self.urls:
            if _URL_SCHEME.match(url) and not re.match(r"^[a-zA-Z]:[\\/]", url):
                if not url.startswith("file:"):
                    raise SourceError(
                        f"webdataset shard {url!r}: only local tar files are supported as a build "
                        "source (random access by row); copy or mount the shards locally"
                    )
                url = url[len("file:"):]
            path = Path(url).expanduser().resolve()
            if not path.is_file():
                raise SourceError(f"webdataset shard {path}: file not found")
            self.shards.append(str(path))
        keys: list[str] = []
        labels: list[int | None] = []
        shard_idx: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        for si, shard in enumerate(self.shards):
            for key, members in self._scan(shard):
                image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
                if image_ext is None:
                    raise SourceError(
                        f"webdataset shard {shard}: sample {key!r} has no image member "
                        f"(found {', '.join(sorted(members)) or 'nothing'}; expected one of "
                        f"{', '.join(WDS_IMAGE_EXTS)})"
                    )
                label = None
                if "cls" in members:
                    text = members["cls"][2].decode("utf-8", "replace").strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise SourceError(
                            f"webdataset shard {shard}: sample {key!r} has a non-integer cls {text!r}"
                        ) from None
                    if label < 0:
                        raise SourceError(f"webdataset shard {shard}: sample {key!r} has negative cls {label}")
                keys.append(escape_key(key))
                labels.append(label)
                shard_idx.append(si)
                off, size, _ = members[image_ext]
                offsets.append(off)
                sizes.append(size)
        if not keys:
            raise SourceError(f"webdataset source {self.urls[0]}...: no samples in {len(self.shards)} shard(s)")
        _check_unique(keys, f"webdataset source ({len(self.shards)} shards, first {self.shards[0]})")
        missing = [k for k, lab in zip(keys, labels) if lab is None]
        if len(missing) == len(keys):
            self.labels = [0] * len(keys)
            self.class_names = [UNLABELED]
        elif missing:
            raise SourceError(
                f"webdataset source: {len(missing)} of {len(keys)} samples have no cls member "
                f"(first: {missing[0]!r}); label all samples or none"
            )
        else:
            self.labels = [int(lab) for lab in labels]  # type: ignore[arg-type]
            self.class_names = _int_label_names(self.labels)
        self.keys = keys
        self._shard = np.asarray(shard_idx, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @staticmethod
    def _scan(shard: str) -> Iterable[tuple[str, dict[str, tuple[int, int, bytes]]]]:
        """Yield (key, {ext: (data offset, size, payload)}) per sample (`group_members`, extensions
        lowercased, members without an extension passed over); the payload is read only for
        ``cls`` (b"" otherwise)."""
        try:
            tf = tarfile.open(shard, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(
                f"webdataset shard {shard}: cannot read as an uncompressed tar (random access "
                f"needs plain .tar shards): {exc}"
            ) from exc

        def entries() -> Iterable[tuple[str, tuple[int, int, bytes]]]:
            for m in tf:
                if not m.isfile():
                    continue
                payload = b""
                if m.name.lower().endswith(".cls"):
                    fobj = tf.extractfile(m)
                    payload = fobj.read() if fobj is not None else b""
                yield m.name, (m.offset_data, m.size, payload)

        with tf:
            yield from group_members(entries(), f"webdataset shard {shard}", skip_unnamed=True, lower_suffix=True,
                                     error=SourceError)

    def __len__(self) -> int:
        return len(self.keys)

    def _fd(self, si: int) -> int:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: do not share offsets
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(si)
        if fd is None:
            fd = self._fds[si] = os.open(self.shards[si], os.O_RDONLY)
        return fd

    def read_bytes(self, row: int) -> bytes:
        """Bytes of the image member of ``row`` (one positional read from its shard)."""
        si, off, size = int(self._shard[row]), int(self._offset[row]), int(self._size[row])
        fd = self._fd(si)
        data = os.pread(fd, size, off) if hasattr(os, "pread") else self._read_seek(fd, off, size)
        if len(data) != size:
            raise OSError(f"webdataset shard {self.shards[si]}: short read for {self.keys[row]!r}")
        return data

    @staticmethod
    def _read_seek(fd: int, off: int, size: int) -> bytes:
        os.lseek(fd, off, os.SEEK_SET)
        return os.read(fd, size)

    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "shards": list(self.shards), "num_samples": len(self),
                "num_classes": len(self.class_names)}

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples)"


class FileListSource(_FileSource):
    """A list of image paths, from a text file (one ``path`` or ``path<TAB>label`` per line;
    blank lines and lines starting with ``#`` are ignored) or a Python list of paths.

    Relative paths are resolved against ``root`` (default: the list file's directory, or the
    current directory for a Python list). Keys are the paths exactly as written. Labels are
    all given or all absent; integer labels are used as is (class names "0".."max"), other
    labels are class names mapped to indices in sorted order (like ImageFolder).
    """

    kind = "filelist"

    def __init__(self, paths_or_list_file: str | os.PathLike | Sequence[str | os.PathLike],
                 root: str | os.PathLike | None = None):
        self.list_file: str | None = None
        entries: list[tuple[str, str | None, int]] = []  # (path, label text, line number)
        if isinstance(paths_or_list_file, (str, os.PathLike)):
            lf = Path(paths_or_list_file).expanduser().resolve()
            if not lf.is_file():
                raise SourceError(f"file list {lf}: file not found")
            self.list_file = str(lf)
            base = Path(root).expanduser().resolve() if root is not None else lf.parent
            where = f"file list {lf}"
            with open(lf, encoding="utf-8", errors="surrogateescape") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    if "\t" in line:
                        path, label = line.rsplit("\t", 1)
                        entries.append((path, label.strip(), lineno))
                    else:
                        entries.append((line, None, lineno))
        else:
            base = Path(root).expanduser().resolve() if root is not None else Path.cwd()
            where = "file list (python list)"
            entries = [(str(p), None, i + 1) for i, p in enumerate(paths_or_list_file)]
        if not entries:
            raise SourceError(f"{where}: no entries")
        self.root = str(base)
        written = [p for p, _, _ in entries]
        self.keys = [escape_key(p) for p in written]
        _check_unique(self.keys, where)
        self.paths = [p if os.path.isabs(p) else os.path.join(self.root, p) for p in written]
        texts = [lab for _, lab, _ in entries]
        if all(t is None for t in texts):
            self.labels = [0] * len(entries)
            self.class_names = [UNLABELED]
        elif any(t is None or t == "" for t in texts):
            bad = next(e for e in entries if e[1] is None or e[1] == "")
            raise SourceError(f"{where}: line {bad[2]} ({bad[0]!r}) has no label; label all lines or none")
        elif all(re.fullmatch(r"[+-]?\d+", t) for t in texts):  # type: ignore[arg-type]
            self.labels = [int(t) for t in texts]  # type: ignore[arg-type]
            neg = [e for e, lab in zip(entries, self.labels) if lab < 0]
            if neg:
                raise SourceError(f"{where}: line {neg[0][2]} has a negative label {neg[0][1]}")
            self.class_names = _int_label_names(self.labels)
        else:
            self.class_names = sorted(set(texts))  # type: ignore[arg-type]
            idx = {c: i for i, c in enumerate(self.class_names)}
            self.labels = [idx[t] for t in texts]  # type: ignore[index]

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "list_file": self.list_file, "root": self.root,
                "num_samples": len(self), "num_classes": len(self.class_names)}

    def __repr__(self) -> str:
        return f"FileListSource({self.list_file or 'python list'}, {len(self)} files)"


LIST_SUFFIXES = (".txt", ".lst", ".list", ".tsv")


def open_source(data: str | os.PathLike | Sequence[str | os.PathLike] | None):
    """Pick the source type from the argument.

    None -> the bundled sample ImageFolder; a directory -> ImageFolderSource; a ``.tar``
    path, a brace pattern (``{000..009}``) or ``::``-joined patterns -> WebDatasetSource;
    a ``.txt``/``.lst``/``.list``/``.tsv`` file -> FileListSource; a Python list -> tars if
    every item ends with ``.tar``, else a FileListSource of those paths.
    """
    if data is None:
        return default_sample_source()
    if isinstance(data, (list, tuple)):
        items = [str(x) for x in data]
        if items and all(x.lower().endswith(".tar") for x in items):
            return WebDatasetSource(items)
        return FileListSource(items)
    s = str(data)
    p = Path(s).expanduser()
    if p.is_dir():
        return ImageFolderSource(p)
    low = s.lower()
    if "::" in s or re.search(r"\{[^}]*(\.\.|,)[^}]*\}", s) or low.endswith(".tar"):
        return WebDatasetSource(s)
    if low.endswith(LIST_SUFFIXES):
        return FileListSource(p)
    if not p.exists():
        raise SourceError(f"data {s!r}: no such file or directory")
    raise SourceError(
        f"data {s!r}: cannot tell the source type; expected an ImageFolder directory, .tar shards "
        f"(optionally a brace pattern like shards-{{0000..0099}}.tar) or a file list "
        f"({', '.join(LIST_SUFFIXES)})"
    )


def default_sample_source() -> ImageFolderSource:
    """The bundled ImageFolder ``pipeline/assets/sample_images`` (3 classes, 10 photos from
    scikit-image's example data), used by ``irepa-cache build`` without ``--data``."""
    return ImageFolderSource(SAMPLE_IMAGES)

"""A damaged store is never read silently; odd inputs and concurrent builds never wedge a build (issue 9).

Every test here damages a store (or its inputs, or runs two builds at once) the way a user's disk,
a user's typo or a killed process would, and checks the one-line message that names what broke.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from irepa.stores import StoreError, StoreLayout, StoreWriter, open_store, verify_store
from irepa.stores.testing import make_synthetic_store, synthetic_arrays

REPO = Path(__file__).resolve().parents[1]
V1 = Path(__file__).resolve().parent / "data" / "v1"


def _store(tmp_path, fmt, name="s", **kw):
    args = dict(num_samples=12, shard_size=4, encoders={"tiny": 8}, grid=(2, 2), latent_channels=2, format=fmt)
    args.update(kw)
    return make_synthetic_store(tmp_path / name, **args)


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def _one_line(msg: str) -> None:
    assert "\n" not in msg, msg


def _tar_member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


# ----------------------------------------------------------------------------- zarr: missing files, index, payload


def test_deleted_listed_zarr_shard_file_is_an_error_never_fill(tmp_path):
    root = _store(tmp_path, "zarr")
    r = open_store(root)
    (root / "features/tiny/c/1/0/0").unlink()
    with pytest.raises(StoreError) as e:
        r.get_batch([5])
    msg = str(e.value)
    _one_line(msg)
    assert str(root) in msg and "'features/tiny'" in msg and "row 5" in msg and "features/tiny/c/1/0/0" in msg
    assert "missing" in msg
    with pytest.raises(StoreError, match="features/tiny/c/1/0/0"):
        list(open_store(root).iter_shard(1))
    r.get_batch([0, 11])  # other shards still read
    (root / "labels/c/2").unlink()  # a missing labels chunk would read back as label -1
    with pytest.raises(StoreError, match=r"'labels'.*labels/c/2.*missing"):
        open_store(root).get_batch([0])


def test_an_unlisted_all_empty_shard_file_reads_as_zeros(tmp_path):
    """zarr writes no file for a shard whose rows are all the fill value: the completion record
    lists none, so those rows are legitimately zeros."""
    layout = StoreLayout(num_rows=8, shard_size=4, latent_channels2=4, latent_hw=(2, 2), encoders={"t": (4, 3)},
                         with_cls=True)
    keys = [f"k{i}" for i in range(8)]
    w = StoreWriter.open(tmp_path / "s", "zarr", layout, keys, np.zeros(8, int), {})
    for s in range(2):
        a = synthetic_arrays(layout, w.shard_rows(s))
        if s == 1:
            a["cls/t"][:] = 0
        w.write_shard(s, a)
    m = w.finalize()
    assert "cls/t/c/1/0" not in m["shards"][1]["files"] and "cls/t/c/0/0" in m["shards"][0]["files"]
    b = open_store(tmp_path / "s").get_batch([1, 6])
    assert b["cls"]["t"][1].tolist() == [0.0, 0.0, 0.0] and np.abs(b["cls"]["t"][0]).sum() > 0


def test_flipped_byte_in_a_zarr_shard_index_is_refused(tmp_path):
    root = _store(tmp_path, "zarr")
    f = root / "latents/c/1/0/0/0"
    size = f.stat().st_size
    index_start = size - 4 - 16 * 4
    _flip(f, index_start + 16 * 2)  # the offset of row 6 (inner chunk 2 of shard 1)
    with pytest.raises(StoreError) as e:
        open_store(root).get_batch([6])
    msg = str(e.value)
    _one_line(msg)
    assert "'latents'" in msg and "latents/c/1/0/0/0" in msg and "index" in msg and "crc32c" in msg


@pytest.mark.parametrize("array,rel,row", [("latents", "latents/c/1/0/0/0", 6), ("features/tiny", "features/tiny/c/1/0/0", 6),
                                           ("flip/features/tiny", "flip/features/tiny/c/2/0/0", 9)])
def test_flipped_payload_byte_in_zarr_names_store_array_row_and_file(tmp_path, array, rel, row):
    root = _store(tmp_path, "zarr", flip=True)
    want = open_store(root).get_batch([row], flip=[array.startswith("flip/")])
    rs = (row % 4)
    row_bytes = {"latents": 4 * 4 * 4 * 4, "features/tiny": 4 * 8 * 2, "flip/features/tiny": 4 * 8 * 2}[array]
    _flip(root / rel, rs * (row_bytes + 4) + 3)  # a byte inside the row's payload
    r = open_store(root)
    with pytest.raises(StoreError) as e:
        r.get_batch([row], flip=[array.startswith("flip/")])
    msg = str(e.value)
    _one_line(msg)
    assert str(root) in msg and f"'{array}'" in msg and f"row {row}" in msg and rel in msg and "crc32c" in msg
    with pytest.raises(StoreError, match=re.escape(rel)):
        list(r.iter_shard(row // 4))
    # the other rows of that shard are intact and still read
    other = (row // 4) * 4 + (rs + 1) % 4
    r.get_batch([other], flip=[array.startswith("flip/")])
    assert want["index"].tolist() == [row]


def test_edited_zarr_json_is_refused_naming_it(tmp_path):
    root = _store(tmp_path, "zarr")
    meta = root / "features/tiny/zarr.json"
    meta.write_text(meta.read_text().replace('"fill_value": 0.0', '"fill_value": 1.0'))
    with pytest.raises(StoreError) as e:
        open_store(root)
    msg = str(e.value)
    _one_line(msg)
    assert str(meta) in msg and "sha256" in msg


def test_flipped_byte_in_zstd_labels_chunk_is_a_one_line_store_error(tmp_path):
    root = _store(tmp_path, "zarr")
    f = root / "labels/c/1"
    _flip(f, len(f.read_bytes()) // 2, 0xFF)
    with pytest.raises(StoreError) as e:
        open_store(root).get_batch([0])
    msg = str(e.value)
    _one_line(msg)
    assert "'labels'" in msg and "labels/c/1" in msg and str(root) in msg


def test_zarr_skip_mode_drops_and_counts_damaged_rows(tmp_path):
    root = _store(tmp_path, "zarr")
    _flip(root / "features/tiny/c/1/0/0", 1 * (4 * 8 * 2 + 4) + 5)  # row 5
    r = open_store(root, on_damage="skip")
    b = r.get_batch([4, 5, 6])
    assert b["index"].tolist() == [4, 6] and b["features"]["tiny"].shape[0] == 2 and b["latents"].shape[0] == 2
    assert len(b["damaged"]) == 1 and "row 5" in b["damaged"][0] and "features/tiny/c/1/0/0" in b["damaged"][0]
    ref = open_store(root, on_damage="raise")
    np.testing.assert_array_equal(b["latents"], ref.get_batch([4, 6])["latents"])
    assert [s["row"] for s in r.iter_shard(1)] == [4, 6, 7]
    with pytest.raises(ValueError, match="on_damage"):
        open_store(root, on_damage="ignore")


# ----------------------------------------------------------------------------- webdataset members


def _read(r, how, shard=1):
    if how == "eager":
        return list(r.iter_shard(shard))
    if how == "lazy":  # what the loader does: read every lazy member
        out = []
        for s in r.iter_shard(shard, lazy=True):
            for k in ("latents", "features"):
                v = s[k]
                for a in (v.values() if isinstance(v, dict) else [v]):
                    a.read()
            out.append(s)
        return out
    if how == "index":
        return [r[r.row_to_index(row)] for row in range(4 * shard, 4 * shard + 4)]
    urls = r.shard_urls("pipe:cat " + str(r.path) + "/{name}")
    return list(r.iter_urls(urls[shard:shard + 1]))


@pytest.mark.parametrize("how", ["eager", "lazy", "index", "pipe"])
@pytest.mark.parametrize("member,delta", [("000000005.cls", 0), ("000000005.feat.tiny.npy", 140),
                                          ("000000005.latents.npy", 200), ("000000005.key.txt", 2)])
def test_flipped_wds_member_byte_names_member_row_and_file(tmp_path, how, member, delta):
    root = _store(tmp_path, "wds", num_classes=4)
    p = root / "shard-000001.tar"
    m = _tar_member(p, member)
    _flip(p, m.offset_data + delta, 0x02)  # '1' -> '3' for the label: another valid class
    r = open_store(root)
    with pytest.raises(StoreError) as e:
        _read(r, how)
    msg = str(e.value)
    _one_line(msg)
    assert member in msg and "crc32c" in msg and "row 5" in msg
    assert (str(p) in msg) or (how == "pipe" and "shard-000001.tar" in msg)
    assert str(root) in msg


def test_wds_skip_mode_drops_and_counts_damaged_samples(tmp_path):
    root = _store(tmp_path, "wds")
    p = root / "shard-000001.tar"
    _flip(p, _tar_member(p, "000000006.feat.tiny.npy").offset_data + 150)
    r = open_store(root, on_damage="skip")
    assert [s["row"] for s in r.iter_shard(1)] == [4, 5, 7]
    assert len(r.damaged) == 1 and "000000006.feat.tiny.npy" in r.damaged[0]


def test_loader_skip_mode_reports_damage_in_the_batch(tmp_path):
    from irepa.trainer.data import LoaderSpec, StoreLoader

    for fmt in ("zarr", "wds"):
        root = _store(tmp_path, fmt, name=fmt)
        if fmt == "zarr":
            _flip(root / "features/tiny/c/1/0/0", 2 * (4 * 8 * 2 + 4) + 5)  # row 6
        else:
            p = root / "shard-000001.tar"
            _flip(p, _tar_member(p, "000000006.feat.tiny.npy").offset_data + 150)
        r = open_store(root)
        kw = dict(kind=r.loader_kind, num_samples=len(r), spec=LoaderSpec(global_batch=12, shuffle=False,
                  shuffle_buffer=0), encoders=r.encoders, steps=1,
                  shard_counts=r.shard_sample_counts() if r.loader_kind == "stream" else None)
        with pytest.raises(StoreError, match="row 6"):
            next(iter(StoreLoader(root, **kw)))
        b = next(iter(StoreLoader(root, on_damage="skip", **kw)))
        assert sorted(b["index"].tolist()) == [i for i in range(12) if i != 6], fmt
        assert len(b["damaged"]) == 1 and "row 6" in b["damaged"][0], fmt


def test_wds_member_missing_from_a_sample_is_named(tmp_path):
    root = _store(tmp_path, "wds")
    p = root / "shard-000000.tar"
    with tarfile.open(p) as tar:
        members = [(ti, tar.extractfile(ti).read()) for ti in tar.getmembers()]
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, b in members:
            if ti.name != "000000002.latents.npy":
                tar.addfile(ti, io.BytesIO(b))
    with pytest.raises(StoreError, match=r"000000002\.latents\.npy.*missing"):
        list(open_store(root).iter_shard(0))


# ----------------------------------------------------------------------------- old stores, inspect


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_format_1_stores_keep_opening_and_inspect_says_which_checks(tmp_path, fmt):
    from irepa.stores import describe_store, format_description

    root = tmp_path / fmt
    shutil.copytree(V1 / fmt, root)
    r = open_store(root)
    assert r.manifest["format_version"] == 1 and len(r) == 5
    samples = [s for sh in range(r.num_shards) for s in r.iter_shard(sh)]
    assert [s["row"] for s in samples] == [0, 2, 3, 4, 5]
    if r.random_access:
        b = r.get_batch(np.arange(5))
        np.testing.assert_array_equal(b["latents"], np.stack([s["latents"] for s in samples]))
    assert verify_store(root).ok
    d = describe_store(root)
    text = format_description(d)
    new = _store(tmp_path, fmt, name="new")
    dn = describe_store(new)
    assert d["read_checks"] != dn["read_checks"]
    assert "read-time checks" in text and "format v1" in text
    assert "crc32c" in format_description(dn)
    if fmt == "zarr":  # the shard index's crc32c is checked on read even in format 1 stores
        f = root / "latents/c/0/0/0/0"
        _flip(f, f.stat().st_size - 4 - 16 * 4 + 16)
        with pytest.raises(StoreError, match="index"):
            open_store(root).get_batch([0])


def test_manifest_is_version_2_and_keeps_unknown_fields(tmp_path):
    from irepa.stores import read_manifest

    root = _store(tmp_path, "zarr")
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 2
    m["encoders"]["tiny"]["preprocess"] = {"resize": "bicubic"}
    m["pixels_note"] = "added by a later version"
    m["arrays"]["pixels"] = {"shape": [12, 3, 16, 16], "dtype": "uint8"}
    (root / "manifest.json").write_text(json.dumps(m))
    got = read_manifest(root)
    assert got["encoders"]["tiny"]["preprocess"] == {"resize": "bicubic"} and got["pixels_note"]


def test_new_zarr_store_reads_with_tensorstore(tmp_path):
    ts = pytest.importorskip("tensorstore")
    root = _store(tmp_path, "zarr", flip=True, feature_dtype="int8", skipped_rows=[2])
    r = open_store(root)
    rows = np.arange(12)
    import zarr

    g = zarr.open_group(str(root), mode="r")
    for name in ("latents", "features/tiny", "feature_scales/tiny", "flip/latents", "labels"):
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)}}).result()
        got = t.read().result()
        np.testing.assert_array_equal(got, g[name][:])
    b = r.get_batch(np.arange(len(r)))
    lat = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / "latents")}}).result()
    np.testing.assert_array_equal(lat.read().result()[np.delete(rows, 2)], b["latents"])
    # tensorstore checks the chunk checksums too: a flipped payload byte fails there as well
    f = root / "latents/c/0/0/0/0"
    _flip(f, 5)
    lat = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / "latents")}}).result()
    with pytest.raises(Exception):
        lat[0].read().result()


# ----------------------------------------------------------------------------- worker errors


def test_one_line_unwraps_dataloader_worker_errors(tmp_path):
    from irepa.stores.errors import one_line
    from irepa.trainer.data import LoaderSpec, StoreLoader

    root = _store(tmp_path, "zarr")
    _flip(root / "latents/c/0/0/0/0", 3)
    r = open_store(root)
    kw = dict(kind=r.loader_kind, num_samples=len(r), spec=LoaderSpec(global_batch=12, shuffle=False),
              encoders=r.encoders, steps=1)
    with pytest.raises(StoreError) as e0:
        next(iter(StoreLoader(root, num_workers=0, **kw)))
    with pytest.raises(StoreError) as e1:
        next(iter(StoreLoader(root, num_workers=1, **kw)))
    assert "DataLoader worker" in str(e1.value) and "Traceback" in str(e1.value)
    assert one_line(e1.value) == one_line(e0.value) == str(e0.value)
    _one_line(one_line(e1.value))
    assert one_line(ValueError("plain")) == "plain"
    # a multi-line original message keeps its lines, without the traceback
    wrapped = RuntimeError("Caught StoreError in DataLoader worker process 3.\nOriginal Traceback (most recent call "
                           "last):\n  File \"x.py\", line 1, in f\n    raise StoreError(m)\n"
                           "irepa.stores.errors.StoreError: first line\n  second line\n")
    assert one_line(wrapped) == "first line\n  second line"


def test_broken_symlink_in_a_source_names_the_file_through_a_worker(tmp_path):
    import torch

    from irepa.pipeline.sources import ImageFolderSource
    from irepa.pipeline.transforms import DecodeDataset
    from irepa.stores.errors import one_line

    (tmp_path / "img" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "img" / "a" / "ok.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "img" / "a" / "zz_broken.png")
    src = ImageFolderSource(tmp_path / "img")
    loader = torch.utils.data.DataLoader(DecodeDataset(src, 16), batch_size=2, num_workers=1)
    with pytest.raises(Exception) as e:
        next(iter(loader))
    msg = one_line(e.value)
    _one_line(msg)
    assert "zz_broken.png" in msg and "broken symbolic link" in msg and "gone.png" in msg


# ----------------------------------------------------------------------------- non-UTF-8 source names


def test_non_utf8_file_names_are_kept_with_an_escape(tmp_path):
    from PIL import Image

    from irepa.pipeline.sources import FileListSource, ImageFolderSource
    from irepa.pipeline.transforms import DecodeDataset
    from irepa.stores import dataset_fingerprint

    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    good = os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (20, 20), (255, 0, 0)).save(root / "a" / good)
    (root / "a" / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    Image.new("RGB", (20, 20)).save(root / "a" / "plain.png")
    src = ImageFolderSource(root)
    assert src.keys == ["a/bad\\xff.png", "a/caf\\xe9.png", "a/plain.png"]
    assert all(k.encode("utf-8") for k in src.keys)
    fp = dataset_fingerprint(src.keys)
    assert fp == dataset_fingerprint(["a/bad\\xff.png", "a/caf\\xe9.png", "a/plain.png"])
    # the fingerprint of raw surrogate-escaped names is defined too, and equal to the escaped keys'
    assert dataset_fingerprint(["a/" + os.fsdecode(b"bad\xff.png"), "a/" + good, "a/plain.png"]) == fp
    ds = DecodeDataset(src, 16)
    assert ds[1]["ok"] and not ds[0]["ok"]
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"img/a/caf\xe9.png\t3\nimg/a/plain.png\t1\n")
    fl = FileListSource(lst)
    assert fl.keys == ["img/a/caf\\xe9.png", "img/a/plain.png"] and fl.read_bytes(0) == (root / "a" / good).read_bytes()

    layout = StoreLayout(num_rows=3, shard_size=2, latent_channels2=2, latent_hw=(1, 1), encoders={"e": (1, 2)})
    raw = ["a/" + os.fsdecode(b"bad\xff.png"), "a/" + good, "a/plain.png"]
    for fmt in ("zarr", "wds"):
        w = StoreWriter.open(tmp_path / fmt, fmt, layout, raw, [0, 0, 0], {})
        for s in w.pending_shards():
            w.write_shard(s, synthetic_arrays(layout, w.shard_rows(s)),
                          [(0, "not an image")] if s == 0 else [])
        m = w.finalize()
        assert m["dataset"]["fingerprint"] == fp
        assert m["skipped"][0]["key"] == "a/bad\\xff.png"
        r = open_store(tmp_path / fmt)
        assert [s["key"] for sh in range(2) for s in r.iter_shard(sh)] == ["a/caf\\xe9.png", "a/plain.png"]


def test_build_keeps_a_non_utf8_named_image(tmp_path):
    from PIL import Image

    from irepa.pipeline.build import build_store

    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "a" / os.fsdecode(b"caf\xe9.png"))
    (root / "a" / os.fsdecode(b"oops\xff.jpg")).write_bytes(b"")
    out = tmp_path / "out"
    build_store(data=str(root), out=str(out), encoder="dinov2-vit-b", resolution=32, shard_size=2, batch_size=2,
                vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu")
    r = open_store(out)
    assert len(r) == 1 and r.keys() == ["a/caf\\xe9.png"]
    assert r.manifest["skipped"] == [{"row": 1, "key": "a/oops\\xff.jpg", "reason": "empty file"}]


# ----------------------------------------------------------------------------- repair, strays


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rebuild(path, fmt, **kw):
    """The same build as _store(...), through StoreWriter (what a rerun of the build command does)."""
    return _store(path.parent, fmt, name=path.name, **kw)


@pytest.mark.parametrize("damage", ["truncated", "invalid", "missing", "not-an-object"])
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_repair_rebuilds_a_broken_manifest_from_the_completion_records(tmp_path, fmt, damage, capsys):
    from irepa.stores import repair_store
    from irepa.stores.testing import synthetic_build

    ref = _store(tmp_path, fmt, name="ref", skipped_rows=[3])
    root = tmp_path / "s"
    shutil.copytree(ref, root)
    mp = root / "manifest.json"
    if damage == "truncated":
        mp.write_bytes(mp.read_bytes()[:200])
    elif damage == "invalid":
        mp.write_text(mp.read_text().replace('"format"', '"fromat"'))
    elif damage == "missing":
        mp.unlink()
    else:
        mp.write_text("[1, 2]")
    if damage != "missing":
        with pytest.raises(StoreError, match="manifest.json"):
            open_store(root)
    repair_store(root)
    out = capsys.readouterr().out
    if damage != "missing":
        assert "manifest.json" in out
    # the rerun of the build (here: the same synthetic writer calls) rebuilds it from the records
    written = synthetic_build(root, fmt, num_samples=12, shard_size=4, encoders={"tiny": 8}, grid=(2, 2),
                              latent_channels=2, skipped_rows=[3])
    assert written == []  # every shard was taken from its completion record, none rewritten
    assert _tree(root) == _tree(ref)


def test_repair_leaves_a_newer_formats_manifest_alone(tmp_path):
    """A manifest of a newer irepa (format_version beyond what this one reads) is not ours to
    rebuild: --repair refuses, naming the version, and the store keeps every byte."""
    from irepa.stores import repair_store

    root = _store(tmp_path, "zarr")
    mp = root / "manifest.json"
    m = json.loads(mp.read_text())
    m["format_version"] = 99
    mp.write_text(json.dumps(m))
    before = _tree(root)
    with pytest.raises(StoreError, match="format_version 99, newer than this irepa reads"):
        repair_store(root)
    assert _tree(root) == before


def test_recovery_refuses_records_of_a_different_build(tmp_path):
    from irepa.stores import repair_store
    from irepa.stores.testing import synthetic_build

    root = _store(tmp_path, "zarr")
    (root / "manifest.json").write_text("{")
    repair_store(root)
    with pytest.raises(StoreError, match="different build"):
        synthetic_build(root, "zarr", num_samples=12, shard_size=4, encoders={"tiny": 16}, grid=(2, 2),
                        latent_channels=2)


def test_recovery_rewrites_shards_whose_records_do_not_verify(tmp_path):
    from irepa.stores.testing import synthetic_build

    ref = _store(tmp_path, "wds", name="ref")
    root = tmp_path / "s"
    shutil.copytree(ref, root)
    (root / "manifest.json").unlink()
    _flip(root / "shard-000002.tar", 700)
    written = synthetic_build(root, "wds", num_samples=12, shard_size=4, encoders={"tiny": 8}, grid=(2, 2),
                              latent_channels=2)
    assert written == [2]
    assert _tree(root) == _tree(ref)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_verify_reports_stray_files_and_repair_removes_them(tmp_path, fmt, capsys):
    from irepa.stores import repair_store

    ref = _store(tmp_path, fmt, name="ref")
    root = tmp_path / "s"
    shutil.copytree(ref, root)
    (root / "junk.bin").write_bytes(b"junk")
    extra = "features/tiny/c/7/0/0" if fmt == "zarr" else "shard-000007.tar"
    (root / extra).parent.mkdir(parents=True, exist_ok=True)
    (root / extra).write_bytes(b"an extra shard")
    rep = verify_store(root)
    assert not rep.ok and sorted(rep.stray) == sorted(["junk.bin", extra])
    text = rep.format()
    assert "junk.bin" in text and extra in text and "not listed in the manifest" in text
    repair_store(root)
    out = capsys.readouterr().out
    assert "junk.bin" in out and extra in out and "remov" in out
    assert verify_store(root).ok and _tree(root) == _tree(ref)


def test_build_repair_rebuilds_a_truncated_manifest(tmp_path, capsys):
    from PIL import Image

    from irepa.pipeline.build import build_store

    root = tmp_path / "img"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (40 * i, 90, 20)).save(root / c / f"{i}.png")
    kw = dict(data=str(root), encoder="dinov2-vit-b", resolution=32, shard_size=2, batch_size=2, vae="tiny",
              encoder_config="tiny", num_workers=0, progress=False, device="cpu")
    ref = tmp_path / "ref"
    build_store(out=str(ref), **kw)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "manifest.json").write_bytes((ref / "manifest.json").read_bytes()[:300])
    (out / "junk.bin").write_bytes(b"x")
    with pytest.raises(StoreError, match="manifest.json"):
        build_store(out=str(out), **kw)
    build_store(out=str(out), repair=True, **kw)
    text = capsys.readouterr().out
    assert "manifest.json" in text and "junk.bin" in text
    assert _tree(out) == _tree(ref)


# ----------------------------------------------------------------------------- the build lock

_BUILD_SCRIPT = textwrap.dedent("""
    import sys, time, os
    from pathlib import Path
    from irepa.pipeline.build import build_store
    import irepa.stores.writer as w

    data, out, shard_size, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    real = w.StoreWriter.write_shard
    def slow(self, *a, **k):  # hold the store until the test removes the `hold` file
        while hold != "-" and os.path.exists(hold):
            time.sleep(0.05)
        return real(self, *a, **k)
    w.StoreWriter.write_shard = slow
    try:
        build_store(data=data, out=out, encoder="dinov2-vit-b", resolution=32, shard_size=shard_size, batch_size=2,
                    vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu")
    except Exception as e:
        print("ERROR:", e, file=sys.stderr)
        sys.exit(2)
    print("DONE")
""")


def _images(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (40 * i, 90, 20)).save(root / c / f"{i}.png")
    return root


def _start_build(data, out, shard_size, hold):
    return subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(data), str(out), str(shard_size), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_second_concurrent_build_fails_at_once_naming_the_holder(tmp_path, capsys):
    """A build holds --out; a second build of the same command and one with another --shard-size
    (which used to leave the store wedged in state 'building') both fail at once naming the first;
    the first then finishes and the store is usable."""
    from irepa.pipeline.build import build_store

    data = _images(tmp_path / "img")
    out = tmp_path / "out"
    hold = tmp_path / "hold"
    hold.write_text("")
    first = _start_build(data, out, 2, hold)
    try:
        _wait_for(out / "manifest.json")  # the first build created the store and waits before its first shard
        others = [_start_build(data, out, size, "-") for size in (2, 3)]
        for p in others:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 2, err
            line = [x for x in err.splitlines() if x.startswith("ERROR:")][0]
            assert f"pid {first.pid}" in line and socket.gethostname() in line and "build.lock" in line, line
        assert first.poll() is None  # the first build was not disturbed
    finally:
        hold.unlink()
    out_text, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "DONE" in out_text, err
    assert verify_store(out).ok and not (out / "build.lock").exists()
    # not wedged: a rerun of the first build finds the store complete
    build_store(data=str(data), out=str(out), encoder="dinov2-vit-b", resolution=32, shard_size=2, batch_size=2,
                vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu")
    assert "already complete" in capsys.readouterr().out


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    from irepa.stores import StoreLock

    store = tmp_path / "s"
    store.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (store / "build.lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    lock = StoreLock.acquire(store)
    said = capsys.readouterr().out
    assert "stale" in said and f"pid {pid}" in said
    assert json.loads((store / "build.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (store / "build.lock").exists()


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    from irepa.stores import StoreLock

    store = tmp_path / "s"
    code = ("import sys, time; from irepa.stores import StoreLock; StoreLock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as e:
            StoreLock.acquire(store)
        msg = str(e.value)
        _one_line(msg)
        assert f"pid {holder.pid}" in msg and str(store) in msg
        with pytest.raises(StoreError, match=f"pid {holder.pid}"):
            StoreLock.check(store)
    finally:
        holder.kill()
        holder.wait()
    StoreLock.check(store)  # the holder died: its lock is free again
    StoreLock.acquire(store).release()


# ----------------------------------------------------------------------------- checkpoints


def test_clean_temporaries_removes_a_killed_runs_checkpoint_tmp_files(tmp_path):
    from irepa.trainer.checkpoint import checkpoint_dir, clean_temporaries

    d = checkpoint_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "0000010.pt").write_bytes(b"a finished checkpoint")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = d / f".0000020.pt.tmp-{int(dead.stdout)}"
    left.write_bytes(b"half written")
    other = d / "notes.tmp-1"
    other.write_bytes(b"not ours")
    removed = clean_temporaries(tmp_path)
    assert removed == [left] and not left.exists()
    assert (d / "0000010.pt").exists() and other.exists()
    assert clean_temporaries(tmp_path) == [] and clean_temporaries(tmp_path / "nothing") == []


def test_checksum_is_crc32c_on_every_buffer_kind():
    """The store checksum is crc32c (Castagnoli): the standard check value; every buffer kind the
    readers hand it (bytes, arrays, memoryview slices, float16 rows) and continued crcs agree with
    google-crc32c on plain bytes."""
    import google_crc32c

    from irepa.stores import checksum

    assert checksum.crc32c(b"123456789") == 0xE3069283  # the published check value of CRC-32C
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 100_003, dtype=np.uint8)
    rows = data[:99_000].view(np.float16).reshape(99, 500)
    for buf in (data.tobytes(), data, memoryview(data)[7:5007], rows[3]):
        assert checksum.crc32c(buf) == google_crc32c.value(bytes(memoryview(buf).cast("B")))
    head = checksum.crc32c(data[:1000])
    assert checksum.crc32c(data[1000:], head) == checksum.crc32c(data) == google_crc32c.extend(
        google_crc32c.value(data[:1000].tobytes()), data[1000:].tobytes())

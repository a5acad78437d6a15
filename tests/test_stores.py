"""Tests of the store format library (stores/): round trips, checksums, resume, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from irepa.stores import (
    StoreError, StoreLayout, StoreWriter, dataset_fingerprint, describe_store, format_description,
    open_store, quantize_int8, verify_store,
)
from irepa.stores.backends import wds as wds_backend
from irepa.stores.layout import dequantize_int8
from irepa.stores.testing import make_synthetic_store, synthetic_arrays

FORMATS = ["zarr", "wds"]


# ----------------------------------------------------------------------------- helpers


def _layout(n=19, shard=8, encoders=None, **kw) -> StoreLayout:
    return StoreLayout(num_rows=n, shard_size=shard, latent_channels2=8, latent_hw=(4, 4),
                       encoders=encoders or {"tiny": (16, 24)}, **kw)


def _keys_labels(n, seed=0):
    labels = np.arange(n) % 3
    return [f"c{labels[r]}/x{r:04d}.jpg" for r in range(n)], labels


INFO = {"dataset": {"source": "test"}, "image": {"resolution": 32, "crop": "adm"},
        "vae": {"id": "test-vae", "latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": 0.0},
        "build_args": {"batch_size": 4}}


def _build(path, fmt, layout, skipped=(), shards=None, finalize=True, seed=0, keys=None, info=INFO):
    """Write `shards` (default all) of a synthetic store; rows in `skipped` are recorded as skipped."""
    k, labels = _keys_labels(layout.num_rows)
    w = StoreWriter.open(path, fmt, layout, keys or k, labels, info)
    for s in (w.pending_shards() if shards is None else shards):
        rows = w.shard_rows(s)
        w.write_shard(s, synthetic_arrays(layout, rows, seed), [(r, f"bad file {r}") for r in rows if r in skipped])
    if finalize:
        w.finalize()
    return w


def _expected(layout, seed=0):
    return synthetic_arrays(layout, range(layout.num_rows), seed)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_file(root: Path, fmt: str) -> Path:
    if fmt == "wds":
        return root / "shard-000001.tar"
    return root / "features/tiny/c/1/0/0"


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_values_labels_keys_and_flip(tmp_path, fmt):
    layout = _layout(flip=True, with_cls=True)
    _build(tmp_path / "s", fmt, layout, skipped={3, 17})
    exp = _expected(layout)
    keys, labels = _keys_labels(19)
    r = open_store(tmp_path / "s")
    valid = [i for i in range(19) if i not in (3, 17)]
    assert len(r) == 17 and r.shard_sample_counts() == [7, 8, 2]
    assert r.latent_shape == (8, 4, 4) and r.token_grid == (4, 4) and r.feature_dims == {"tiny": 24}
    assert r.encoders == ["tiny"] and r.has_flip and r.num_shards == 3

    got = [s for sh in range(3) for s in r.iter_shard(sh)]
    assert [s["row"] for s in got] == valid and [s["index"] for s in got] == list(range(17))
    assert [s["label"] for s in got] == [int(labels[i]) for i in valid]
    assert [s["key"] for s in got] == [keys[i] for i in valid]
    for s in got:
        row = s["row"]
        np.testing.assert_array_equal(s["latents"], exp["latents"][row])
        np.testing.assert_array_equal(s["latents_flip"], exp["flip/latents"][row])
        np.testing.assert_allclose(s["features"]["tiny"], exp["features/tiny"][row], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s["features_flip"]["tiny"], exp["flip/features/tiny"][row], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s["cls"]["tiny"], exp["cls/tiny"][row], rtol=1e-3, atol=1e-3)
        assert s["features"]["tiny"].dtype == np.float32 and s["latents"].dtype == np.float32

    item = r[3]  # sample index 3 is row 4
    assert item["key"] == keys[4] and item["label"] == labels[4]
    np.testing.assert_array_equal(item["latents"], exp["latents"][4])

    if fmt == "zarr":
        idx = np.array([16, 0, 5, 5, 2])
        flip = np.array([True, False, True, False, False])
        b = r.get_batch(idx, flip=flip)
        rows = np.array(valid)[idx]
        assert b["index"].tolist() == idx.tolist()
        assert b["label"].tolist() == labels[rows].tolist() and b["key"] == [keys[i] for i in rows]
        assert b["latents"].shape == (5, 8, 4, 4) and b["features"]["tiny"].shape == (5, 16, 24)
        for j, (row, f) in enumerate(zip(rows, flip)):
            pre = "flip/" if f else ""
            np.testing.assert_array_equal(b["latents"][j], exp[pre + "latents"][row])
            np.testing.assert_allclose(b["features"]["tiny"][j], exp[pre + "features/tiny"][row], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(b["cls"]["tiny"][j], exp[pre + "cls/tiny"][row], rtol=1e-3, atol=1e-3)
        assert r.labels.tolist() == [int(labels[i]) for i in valid]
        blocks = list(r._iter_zarr_shard(1, block=3))  # a shard read in several blocks
        assert [s["row"] for s in blocks] == [s["row"] for s in got if 8 <= s["row"] < 16]
        np.testing.assert_array_equal(blocks[4]["features_flip"]["tiny"], got[11]["features_flip"]["tiny"])
    else:
        with pytest.raises(StoreError, match="random access"):
            r.get_batch([0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_features_dequantise_close_to_fp32(tmp_path, fmt):
    layout = _layout(feature_dtype="int8", flip=True)
    _build(tmp_path / "s", fmt, layout)
    exp = _expected(layout)
    r = open_store(tmp_path / "s")
    feats = np.stack([s["features"]["tiny"] for sh in range(3) for s in r.iter_shard(sh)])
    ref = exp["features/tiny"]
    cos = (feats * ref).sum(-1) / (np.linalg.norm(feats, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.mean() > 0.999 and cos.min() > 0.99
    q, s = quantize_int8(ref)  # the stored values are exactly the symmetric per-token quantisation
    np.testing.assert_array_equal(feats, q.astype(np.float32) * s[..., None])
    assert np.abs(q).max() == 127
    np.testing.assert_allclose(s, np.abs(ref).max(-1) / 127, rtol=1e-6)


def test_float16_latents_option(tmp_path):
    layout = _layout(latent_dtype="float16")
    _build(tmp_path / "s", "zarr", layout)
    r = open_store(tmp_path / "s")
    b = r.get_batch(np.arange(len(r)))
    assert r.manifest["arrays"]["latents"]["dtype"] == "float16" and b["latents"].dtype == np.float32
    np.testing.assert_allclose(b["latents"], _expected(layout)["latents"], rtol=1e-3, atol=1e-3)


def test_plain_zarr_and_plain_tarfile_can_read(tmp_path):
    import zarr

    layout = _layout()
    _build(tmp_path / "z", "zarr", layout, skipped={2})
    _build(tmp_path / "w", "wds", layout, skipped={2})
    keys, labels = _keys_labels(19)
    exp = _expected(layout)

    g = zarr.open_group(str(tmp_path / "z"), mode="r")
    assert [str(k) for k in g["keys"][:]] == keys
    lab = g["labels"][:]
    assert lab[2] == -1 and np.delete(lab, 2).tolist() == np.delete(labels, 2).tolist()
    np.testing.assert_array_equal(g["latents"][5], exp["latents"][5])
    assert g["features/tiny"].dtype == np.float16 and g["features/tiny"].shape == (19, 16, 24)
    assert g["latents"].shards == (8, 8, 4, 4) and g["latents"].chunks == (1, 8, 4, 4)

    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert "000000002.latents.npy" not in names  # skipped rows are not written
        lat = np.load(io.BytesIO(tar.extractfile("000000001.latents.npy").read()), allow_pickle=False)
        assert tar.extractfile("000000001.key.txt").read().decode() == keys[1]
        assert tar.extractfile("000000001.cls").read().decode() == str(labels[1])
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    np.testing.assert_array_equal(lat, exp["latents"][1])


def test_shard_files_are_the_bytes_zarr_itself_writes(tmp_path):
    import zarr

    from irepa.stores.backends.zarr import chunk_file, create_arrays

    layout = _layout(feature_dtype="int8", with_cls=True, flip=True)
    _build(tmp_path / "s", "zarr", layout, skipped={2, 17})
    ref = tmp_path / "ref"
    create_arrays(ref, layout)
    mine = zarr.open_group(str(tmp_path / "s"), mode="r")
    theirs = zarr.open_group(str(ref), mode="r+")
    exp = _expected(layout)
    for name, (shape, _) in layout.array_specs().items():
        values = mine[name][:]  # plain zarr decodes every file this package wrote
        if name in exp:
            want = exp[name].astype(values.dtype) if values.dtype != np.int8 else values
            want = want.copy()
            want[[2, 17]] = 0
            np.testing.assert_array_equal(values, want)
        theirs[name][:] = values  # zarr encodes the same content itself
        for shard in range(3):
            rel = chunk_file(name, len(shape), shard)
            assert (ref / rel).read_bytes() == (tmp_path / "s" / rel).read_bytes(), rel


def test_webdataset_streams_pipe_urls_and_sanitised_encoder_names(tmp_path):
    layout = _layout(encoders={"DINOv2-vit.b": (16, 8), "dinov2_vit_b": (16, 4)})
    _build(tmp_path / "w", "wds", layout, skipped={9})
    r = open_store(tmp_path / "w")
    members = {n: e["member"] for n, e in r.manifest["encoders"].items()}
    assert members == {"DINOv2-vit.b": "dinov2_vit_b", "dinov2_vit_b": "dinov2_vit_b_2"}
    urls = r.shard_urls("pipe:cat " + str(tmp_path / "w") + "/{name}")
    streamed = list(r.iter_urls(urls))
    local = [s for sh in range(r.num_shards) for s in r.iter_shard(sh)]
    assert [s["index"] for s in streamed] == list(range(18)) == [s["index"] for s in local]
    exp = _expected(layout)
    for s in streamed:
        np.testing.assert_allclose(s["features"]["DINOv2-vit.b"], exp["features/DINOv2-vit.b"][s["row"]], atol=1e-3, rtol=1e-3)
        assert s["features"]["dinov2_vit_b"].shape == (16, 4)


# ----------------------------------------------------------------------------- local tar reads


def _tarfile_members(path: Path) -> list[tuple[str, bytes]]:
    """Every regular member, in archive order, read by tarfile (the reference)."""
    with tarfile.open(path) as tar:
        return [(ti.name, tar.extractfile(ti).read()) for ti in tar.getmembers() if ti.isreg()]


def _same(a, b, what=""):
    """Nested sample dicts equal: arrays of the same dtype and shape, byte for byte."""
    if isinstance(a, wds_backend.LazyArray):
        a = a.read()
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _same(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), what
    else:
        assert a == b, what


def _reference_sample(r, key, raw, features_dtype):
    """A sample decoded from tarfile bytes with np.load: the reader's contract, computed apart."""
    load = lambda suffix: np.load(io.BytesIO(raw[suffix]), allow_pickle=False)  # noqa: E731
    s = {"index": int(np.searchsorted(r.rows, int(key))), "row": int(key), "label": int(raw["cls"]),
         "key": raw["key.txt"].decode()}
    for pre, suf in [("", ""), ("flip.", "_flip")][:1 + r.has_flip]:
        s["latents" + suf] = load(pre + "latents.npy").astype(np.float32)
        feats, cls = {}, {}
        for e, m in ((e, r.manifest["encoders"][e]["member"]) for e in r.encoders):
            f = load(f"{pre}feat.{m}.npy")
            if f.dtype == np.int8:
                f = dequantize_int8(f, load(f"{pre}scale.{m}.npy"))
            feats[e] = f.astype(features_dtype)
            if f"{pre}clstoken.{m}.npy" in raw:
                cls[e] = load(f"{pre}clstoken.{m}.npy").astype(np.float32)
        s["features" + suf] = feats
        if cls:
            s["cls" + suf] = cls
    return s


@pytest.mark.parametrize("kw", [dict(flip=True, with_cls=True), dict(feature_dtype="int8", flip=True)])
def test_local_tar_reads_equal_tarfile_byte_for_byte(tmp_path, kw):
    # an encoder name over 100 characters makes tarfile write pax headers for its members
    layout = _layout(encoders={"tiny": (16, 24), "e" * 120: (16, 8)}, **kw)
    _build(tmp_path / "w", "wds", layout, skipped={3, 12})
    r = open_store(tmp_path / "w")
    for sh in range(r.num_shards):
        p = r.shard_path(sh)
        ref = _tarfile_members(p)
        assert any(len(n) > 100 for n, _ in ref)
        eager = [(f"{k}.{suf}", bytes(v)) for k, d in wds_backend.iter_local(p) for suf, v in d.items()]
        assert eager == ref
        lazy = [(f"{k}.{suf}", v) for k, d in wds_backend.iter_local(p, lazy=True) for suf, v in d.items()]
        assert [n for n, _ in lazy] == [n for n, _ in ref]
        for (name, v), (_, b) in zip(lazy, ref):
            if name.endswith(".npy"):
                want = np.load(io.BytesIO(b), allow_pickle=False)
                got = v.read()
                assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
                into = np.full(want.shape, 7, want.dtype)
                v.read_into(into)
                assert into.tobytes() == want.tobytes(), name
            else:
                assert v == b, name
        ref_raw = list(wds_backend.iter_tar(p))
        for dt in (np.float32, np.float16):
            want = [_reference_sample(r, k, raw, dt) for k, raw in ref_raw]
            eager_s = list(r.iter_shard(sh, features_dtype=dt))
            lazy_s = list(r.iter_shard(sh, features_dtype=dt, lazy=True))
            assert len(want) == len(eager_s) == len(lazy_s) == r.shard_sample_counts()[sh]
            for w, e, z in zip(want, eager_s, lazy_s):
                _same(e, w, f"eager row {w['row']}")
                _same(z, w, f"lazy row {w['row']}")
                i = w["index"]
                _same(r[i], _reference_sample(r, *ref_raw[[x["index"] for x in want].index(i)], np.float32))
        # lazy features read into a float16 batch = the eager float32 features cast to float16
        batch = np.empty((1, 16, 24), np.float16)
        z = next(r.iter_shard(sh, lazy=True))
        z["features"]["tiny"].read_into(batch[0])
        assert np.array_equal(batch[0], next(r.iter_shard(sh))["features"]["tiny"].astype(np.float16))


@pytest.mark.parametrize("probe", [BlockingIOError, OSError])
def test_lazy_pass_reads_a_cold_shard_through(tmp_path, monkeypatch, probe):
    """The lazy pass probes the page cache with RWF_NOWAIT; a miss (BlockingIOError) reads the
    file ahead in one read, a file system without the flag (OSError) falls back to plain reads.
    Either way the samples are the same."""
    import os

    _build(tmp_path / "w", "wds", _layout(flip=True))
    r = open_store(tmp_path / "w")
    want = [s for sh in range(3) for s in r.iter_shard(sh)]
    real, sizes, probes = os.preadv, [], []

    def preadv(fd, bufs, off, flags=0):
        if flags:
            probes.append(off)
            raise probe("probe")
        sizes.append(sum(memoryview(b).nbytes for b in bufs))
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(wds_backend, "_READ_THROUGH", 5000)  # > the 4 KiB header reads
    got = [s for sh in range(3) for s in r.iter_shard(sh, lazy=True)]
    assert len(got) == len(want) == 19
    for a, b in zip(got, want):
        _same(a, b, str(b["row"]))
    if probe is BlockingIOError:
        assert len(probes) > 3 and sizes.count(5000) >= len(probes) - 3  # read through on each miss
    else:
        assert len(probes) == 3 and 5000 not in sizes  # one probe per shard, then plain reads


def test_local_reader_handles_gnu_long_names_and_odd_members(tmp_path):
    p = tmp_path / "gnu.tar"
    entries = [("000000000." + "a" * 150 + ".npy", io.BytesIO(), np.arange(6, dtype=np.float16).reshape(2, 3)),
               ("000000000.cls", None, b"5"),
               ("000000001.latents.npy", None, np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))]
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, _, v in entries:
            if isinstance(v, np.ndarray):
                buf = io.BytesIO()
                np.save(buf, v, allow_pickle=False)
                v = buf.getvalue()
            ti = tarfile.TarInfo(name)
            ti.size = len(v)
            tar.addfile(ti, io.BytesIO(v))
    ref = _tarfile_members(p)
    assert [n for n, _ in ref][0].startswith("000000000.aaa")
    got = [(f"{k}.{suf}", bytes(v)) for k, d in wds_backend.iter_local(p) for suf, v in d.items()]
    assert got == ref
    lazy = {f"{k}.{suf}": v for k, d in wds_backend.iter_local(p, lazy=True) for suf, v in d.items()}
    f = lazy["000000001.latents.npy"]
    assert f.fortran and np.array_equal(f.read(), np.arange(12, dtype=np.float32).reshape(3, 4))
    out = np.empty((3, 4), np.float64)
    f.read_into(out)  # converts
    assert np.array_equal(out, np.arange(12).reshape(3, 4))
    assert np.array_equal(wds_backend.load_npy(ref[2][1], "x"), np.arange(12, dtype=np.float32).reshape(3, 4))


def _member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def _read_all(r, shard, how):
    if how == "eager":
        return list(r.iter_shard(shard))
    if how == "lazy":
        return list(r.iter_shard(shard, lazy=True))
    return r[r.row_to_index(10)]  # random access: the tar index


@pytest.mark.parametrize("how", ["eager", "lazy", "index"])
def test_truncated_or_corrupt_tar_names_shard_file_and_member(tmp_path, how):
    _build(tmp_path / "w", "wds", _layout())
    r = open_store(tmp_path / "w")
    p = r.shard_path(1)
    good = p.read_bytes()
    feat = _member(p, "000000010.feat.tiny.npy")
    after = _member(p, "000000010.key.txt")  # the member after it
    f = re.escape(str(p))

    p.write_bytes(good[:feat.offset_data + 100])  # cut inside the payload
    with pytest.raises(StoreError, match=f"shard file {f}: member '000000010.feat.tiny.npy' needs bytes.*truncated"):
        _read_all(r, 1, how)

    p.write_bytes(good[:after.offset])  # cut right after a member: the end-of-archive block is missing
    with pytest.raises(StoreError, match=f"shard file {f}: .*after member '000000010.feat.tiny.npy'.*end-of-archive"):
        _read_all(r, 1, how)

    bad = bytearray(good)
    bad[after.offset + 5] ^= 0x20  # a header byte: its checksum no longer matches
    p.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=f"shard file {f}: bad tar header checksum at byte {after.offset} "
                                         r"\(after member '000000010.feat.tiny.npy'\)"):
        _read_all(r, 1, how)

    bad = bytearray(good)
    bad[feat.offset_data:feat.offset_data + 6] = b"NOTNPY"  # the npy payload's magic
    p.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=f"{f}.*member '000000010.feat.tiny.npy'.*not a readable .npy member"):
        _read_all(r, 1, how)
    if how == "lazy":  # the payload is not read: the header parse is what catches it
        return
    bad = bytearray(good)
    bad[feat.offset_data + 200] ^= 0xFF  # a payload byte: format 2's per-member crc32c names it on read
    p.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=f"{f}.*member '000000010.feat.tiny.npy'.*crc32c mismatch"):
        _read_all(r, 1, how)
    assert not verify_store(tmp_path / "w").ok


def test_shard_missing_a_sample_is_refused(tmp_path):
    _build(tmp_path / "w", "wds", _layout())
    r = open_store(tmp_path / "w")
    p = r.shard_path(1)
    members = _tarfile_members(p)
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tar:  # rewrite without row 10
        for name, b in members:
            if not name.startswith("000000010."):
                ti = tarfile.TarInfo(name)
                ti.size = len(b)
                tar.addfile(ti, io.BytesIO(b))
    for lazy in (False, True):
        with pytest.raises(StoreError, match=re.escape(str(p)) + r".* of row 11 where the manifest expects row 10"):
            list(r.iter_shard(1, lazy=lazy))
    with pytest.raises(StoreError, match=re.escape(str(p)) + ".* no sample '000000010'"):
        r[r.row_to_index(10)]


def test_local_urls_take_the_local_path(tmp_path):
    _build(tmp_path / "w", "wds", _layout(flip=True))
    r = open_store(tmp_path / "w")
    local = [s for sh in range(r.num_shards) for s in r.iter_shard(sh, features_dtype=np.float16)]
    for urls in (r.shard_urls(), ["file:" + u for u in r.shard_urls()]):
        assert wds_backend.is_local_url(urls[0]) == str(r.shard_path(0))
        got = list(r.iter_urls(urls, features_dtype=np.float16))
        assert len(got) == len(local)
        for a, b in zip(got, local):
            _same(a, b)
    assert wds_backend.is_local_url("pipe:cat " + r.shard_urls()[0]) is None


# ----------------------------------------------------------------------------- checksums and refusals


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_finds_and_names_a_flipped_byte(tmp_path, fmt):
    root = tmp_path / "s"
    _build(root, fmt, _layout())
    assert verify_store(root).ok
    f = _shard_file(root, fmt)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    rep = verify_store(root)
    rel = f.relative_to(root).as_posix()
    assert not rep.ok and list(rep.bad_shards) == [1] and rep.bad_shards[1][0][0] == rel
    assert "bad shard 1" in rep.format() and rel in rep.format()
    with pytest.raises(StoreError, match="bad shard 1"):
        open_store(root, verify_checksums=True)
    f.unlink()
    assert verify_store(root).bad_shards[1] == [(rel, "missing")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_unfinished_store_is_refused_with_a_clear_message(tmp_path, fmt):
    root = tmp_path / "s"
    w = _build(root, fmt, _layout(), shards=[1], finalize=False)
    with pytest.raises(StoreError, match=r"unfinished.*1 of 3 shards done"):
        open_store(root)
    r = open_store(root, allow_incomplete=True)
    assert len(r) == 8 and r.shard_sample_counts() == [0, 8, 0]
    assert [s["row"] for s in r.iter_shard(1)] == list(range(8, 16))
    rep = verify_store(root)
    assert not rep.ok and "unfinished" in rep.format() and rep.shards_checked == 1
    d = describe_store(root)
    assert d["state"] == "building" and d["shards_done"] == 1
    assert "UNFINISHED build: 1 of 3" in format_description(d)
    with pytest.raises(StoreError, match=r"2 of 3 shard\(s\) have no completion record: 0, 2"):
        w.finalize()


def test_missing_manifest_and_unknown_version_are_refused(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(tmp_path / "empty")
    root = make_synthetic_store(tmp_path / "s", num_samples=4, shard_size=2)
    m = json.loads((root / "manifest.json").read_text())
    m["format_version"] = 3  # a newer format than this irepa knows (2 is current, 1 still read)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="format_version 3; this irepa reads format versions 1 and 2"):
        open_store(root)
    del m["format_version"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="not an irepa store"):
        open_store(root)


def test_write_shard_rejects_bad_input(tmp_path):
    layout = _layout()
    keys, labels = _keys_labels(19)
    w = StoreWriter.open(tmp_path / "s", "zarr", layout, keys, labels, INFO)
    a = synthetic_arrays(layout, w.shard_rows(0))
    with pytest.raises(StoreError, match=r"'features/tiny' has shape \(8, 16, 23\), expected \(8, 16, 24\)"):
        w.write_shard(0, {**a, "features/tiny": a["features/tiny"][..., :23]})
    with pytest.raises(StoreError, match=r"missing \['latents'\]"):
        w.write_shard(0, {"features/tiny": a["features/tiny"]})
    bad = a["latents"].copy()
    bad[5, 0, 0, 0] = np.nan
    with pytest.raises(StoreError, match=r"'latents' has NaN/inf in shard-relative row\(s\) \[5\]"):
        w.write_shard(0, {**a, "latents": bad})
    w.write_shard(0, {**a, "latents": bad}, skipped=[(5, "decode error")])  # fine once row 5 is skipped
    with pytest.raises(StoreError, match="skipped row 20 is not in this shard"):
        w.write_shard(1, a, skipped=[(20, "x")])
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter.open(tmp_path / "s", "zarr", layout, keys, labels, INFO, resume=False)


# ----------------------------------------------------------------------------- resume and many writers


@pytest.mark.parametrize("fmt", FORMATS)
def test_resumed_build_is_byte_identical(tmp_path, fmt):
    layout = _layout(n=30, flip=True, feature_dtype="int8")
    skipped = {4, 29}
    _build(tmp_path / "a", fmt, layout, skipped=skipped)

    b = tmp_path / "b"
    _build(b, fmt, layout, skipped=skipped, shards=[0, 2], finalize=False)
    # a crash while writing shard 1: temporaries and a stale data file without a completion record
    stale = _shard_file(b, fmt)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"garbage from a killed writer")
    (stale.parent / (stale.name + ".1234abcd.partial")).write_bytes(b"half")
    (b / "_progress" / "shard-000001.json.99.partial").write_bytes(b"{")

    keys, labels = _keys_labels(30)
    w = StoreWriter.open(b, fmt, layout, keys, labels, INFO)
    assert w.pending_shards() == [1, 3]
    for s in w.pending_shards():
        rows = w.shard_rows(s)
        w.write_shard(s, synthetic_arrays(layout, rows), [(r, f"bad file {r}") for r in rows if r in skipped])
    w.finalize()
    ta, tb = _tree(tmp_path / "a"), _tree(b)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []
    assert "manifest.json" in ta and not any(k.endswith(".partial") for k in tb)


def test_resume_with_a_different_build_names_the_differences(tmp_path):
    layout = _layout()
    _build(tmp_path / "s", "zarr", layout, shards=[0], finalize=False)
    keys, labels = _keys_labels(19)
    other = _layout(encoders={"tiny": (16, 32)})
    with pytest.raises(StoreError) as e:
        StoreWriter.open(tmp_path / "s", "zarr", other, ["z" + k for k in keys], labels, INFO)
    msg = str(e.value)
    assert "cannot be resumed" in msg and "dataset.fingerprint" in msg and "encoders.tiny.dim" in msg
    assert "arrays.features/tiny.shape" in msg
    # build_args may differ (e.g. batch size): the stored ones are kept
    w = StoreWriter.open(tmp_path / "s", "zarr", layout, keys, labels, {**INFO, "build_args": {"batch_size": 8}})
    assert w.pending_shards() == [1, 2]
    # so may where the data lives (a remount): the fingerprint pins what it is
    moved = {**INFO, "dataset": {**INFO["dataset"], "source": "/mnt/elsewhere/train", "root": "/mnt/elsewhere/train"}}
    assert StoreWriter.open(tmp_path / "s", "zarr", layout, keys, labels, moved).pending_shards() == [1, 2]
    with pytest.raises(StoreError, match="dataset.num_classes"):
        StoreWriter.open(tmp_path / "s", "zarr", layout, keys, labels,
                         {**INFO, "dataset": {**INFO["dataset"], "num_classes": 999}})


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_writers_disjoint_shards_then_finalize(tmp_path, fmt):
    layout = _layout(n=40)
    _build(tmp_path / "single", fmt, layout, skipped={7})
    keys, labels = _keys_labels(40)
    root = tmp_path / "multi"
    writers = [StoreWriter.open(root, fmt, layout, keys, labels, INFO) for _ in range(2)]  # rank 0 first
    for rank, w in enumerate(writers):
        for s in range(rank, w.num_shards, 2):
            rows = w.shard_rows(s)
            w.write_shard(s, synthetic_arrays(layout, rows), [(r, f"bad file {r}") for r in rows if r in (7,)])
    assert writers[1].pending_shards() == []
    writers[0].finalize()
    assert _tree(root) == _tree(tmp_path / "single")
    r = open_store(root)
    assert len(r) == 39 and r.manifest["state"] == "complete"


def test_latent_stats_match_numpy(tmp_path):
    layout = _layout(n=21)
    _build(tmp_path / "s", "zarr", layout, skipped={0, 13})
    lat = np.delete(_expected(layout)["latents"], [0, 13], axis=0).astype(np.float64)
    mean, std = lat[:, :4], lat[:, 4:]
    # z = mean + std * eps: E[z] = E[mean], Var[z] = Var[mean] + E[std^2] (law of total variance)
    exp_mean = mean.mean(axis=(0, 2, 3))
    exp_std = np.sqrt(mean.var(axis=(0, 2, 3)) + (std ** 2).mean(axis=(0, 2, 3)))
    ls = open_store(tmp_path / "s").manifest["latent_stats"]
    assert ls["count"] == 19 * 16
    np.testing.assert_allclose(ls["mean"], exp_mean, rtol=1e-10)
    np.testing.assert_allclose(ls["std"], exp_std, rtol=1e-10)


# ----------------------------------------------------------------------------- latents_from


def _features_only(tmp_path, src, fmt="zarr", keys=None):
    layout = _layout(write_latents=False)
    k, labels = _keys_labels(19)
    info = {**INFO, "latents_from": {"path": str(src)}}
    w = StoreWriter.open(tmp_path / "f", fmt, layout, keys or k, labels, info)
    for s in w.pending_shards():
        a = synthetic_arrays(layout, w.shard_rows(s), seed=5)
        w.write_shard(s, a, [(r, "bad") for r in w.shard_rows(s) if r == 3])
    w.finalize()
    return tmp_path / "f"


@pytest.mark.parametrize("fmt", FORMATS)
def test_latents_from_reads_the_other_stores_latents(tmp_path, fmt):
    src = tmp_path / "src"
    _build(src, fmt, _layout())
    f = _features_only(tmp_path, src, fmt)
    r = open_store(f)
    assert "latents" not in r.manifest["arrays"] and r.manifest["latents_from"]["path"] == "../src"
    assert r.manifest["latent_stats"] == open_store(src).manifest["latent_stats"]
    lat = _expected(_layout())["latents"]
    samples = [s for sh in range(3) for s in r.iter_shard(sh)]
    assert len(samples) == 18
    for s in samples:
        np.testing.assert_array_equal(s["latents"], lat[s["row"]])
    lazy = [s for sh in range(3) for s in r.iter_shard(sh, lazy=True)]  # the loader's path
    assert [s["row"] for s in lazy] == [s["row"] for s in samples]
    for s in lazy:
        got = s["latents"].read() if fmt == "wds" else s["latents"]
        np.testing.assert_array_equal(got, lat[s["row"]])
    np.testing.assert_allclose(samples[0]["features"]["tiny"], _expected(_layout(write_latents=False), seed=5)["features/tiny"][0], atol=1e-3)
    if fmt == "zarr":
        b = r.get_batch([4, 0])
        np.testing.assert_array_equal(b["latents"], lat[[5, 0]])


def test_latents_from_fingerprint_mismatch_names_both(tmp_path):
    src = tmp_path / "src"
    _build(src, "zarr", _layout())
    f = _features_only(tmp_path, src)
    good = open_store(src).manifest["dataset"]["fingerprint"]
    keys, _ = _keys_labels(19)
    other_keys = [k + ".other" for k in keys]
    shutil.rmtree(src)
    _build(src, "zarr", _layout(), keys=other_keys)
    bad = dataset_fingerprint(other_keys)
    with pytest.raises(StoreError) as e:
        open_store(f)
    assert good in str(e.value) and bad in str(e.value)
    with pytest.raises(StoreError) as e:  # the writer refuses the pairing up front
        _features_only(tmp_path / "x", src)
    assert good in str(e.value) and bad in str(e.value)
    shutil.rmtree(src)
    with pytest.raises(StoreError, match="does not exist or has no manifest"):
        open_store(f)


# ----------------------------------------------------------------------------- manifest, inspect, synthetic


def test_manifest_contents_and_describe(tmp_path):
    root = tmp_path / "s"
    _build(root, "zarr", _layout(with_cls=True), skipped={5})
    keys, _ = _keys_labels(19)
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["state"] == "complete" and m["num_samples"] == 18
    assert m["dataset"]["fingerprint"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert m["skipped"] == [{"row": 5, "key": keys[5], "reason": "bad file 5"}]
    assert [s["rows"] for s in m["shards"]] == [[0, 8], [8, 16], [16, 19]]
    assert m["encoders"]["tiny"]["token_grid"] == [4, 4] and m["encoders"]["tiny"]["dim"] == 24
    assert m["arrays"]["cls/tiny"] == {"shape": [19, 24], "dtype": "float16"}
    assert m["build_args"] == {"batch_size": 4} and isinstance(m["package_version"], str)
    d = describe_store(root)
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert d["bytes_total"] == on_disk and d["bytes_per_sample"] == pytest.approx(on_disk / 18)
    assert d["skipped_reasons"] == {"bad file 5": 1}
    text = format_description(d)
    assert "features/tiny" in text and "(19, 16, 24)" in text and "row 5: " + keys[5] in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_make_synthetic_store(tmp_path, fmt):
    root = make_synthetic_store(tmp_path / "s", num_samples=10, encoders={"a": 8, "b-2": 4}, format=fmt,
                                shard_size=4, flip=True, num_classes=3, skipped_rows=[1])
    r = open_store(root)
    assert len(r) == 9 and r.encoders == ["a", "b-2"] and r.latent_shape == (8, 8, 8)
    assert r.token_grid == (4, 4) and r.feature_dims == {"a": 8, "b-2": 4} and r.has_flip
    s = next(r.iter_shard(0))
    assert s["features"]["b-2"].shape == (16, 4) and s["label"] == 0
    assert verify_store(root).ok


def test_import_has_no_torch_and_reader_pickles(tmp_path):
    import pickle
    import subprocess
    import sys

    code = "import sys, stores, stores.testing; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    root = make_synthetic_store(tmp_path / "s", num_samples=6, shard_size=4)
    r = open_store(root)
    r.get_batch([0, 1])
    r2 = pickle.loads(pickle.dumps(r))
    b1, b2 = r.get_batch([5, 2]), r2.get_batch([5, 2])
    np.testing.assert_array_equal(b1["latents"], b2["latents"])
    assert b2["row"].tolist() == [5, 2] and b2["key"] == b1["key"]

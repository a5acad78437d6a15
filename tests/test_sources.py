"""Sources (ImageFolder / webdataset tars / file lists), decoding rules and the ADM crop."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irepa.pipeline.sources import (
    FileListSource,
    ImageFolderSource,
    SourceError,
    WebDatasetSource,
    default_sample_source,
    open_source,
)
from irepa.pipeline.transforms import (
    DecodeDataset,
    DecodeError,
    center_crop_adm,
    collate_decoded,
    load_rgb,
)

skdata = pytest.importorskip("skimage.data")


def _png(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def _palette_image() -> Image.Image:
    arr = (np.add.outer(np.arange(40), np.arange(50)) % 7).astype(np.uint8)
    im = Image.fromarray(arr, mode="L").convert("P")
    pal = []
    for i in range(256):
        pal += [(i * 37) % 256, (i * 91) % 256, (i * 13) % 256]
    im.putpalette(pal)
    im.info["transparency"] = 3
    return im


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """An ImageFolder with mixed modes and sizes plus three undecodable files."""
    root = tmp_path_factory.mktemp("imgfolder")
    astro = Image.fromarray(skdata.astronaut())
    files: dict[str, bytes] = {}
    # class order must follow sorted(): "A_class" < "b_class" < "c"
    files["A_class/large.JPEG"] = _jpeg(astro.resize((1100, 700), Image.Resampling.BICUBIC))
    files["A_class/gray.png"] = _png(Image.fromarray(skdata.camera()))
    files["A_class/cmyk.jpg"] = _jpeg(Image.fromarray(skdata.chelsea()).convert("CMYK"))
    files["b_class/palette.png"] = _png(_palette_image())
    rgba = np.dstack([skdata.coffee()[:200, :300], np.tile(np.arange(300, dtype=np.uint8), (200, 1))])
    files["b_class/rgba.png"] = _png(Image.fromarray(rgba, mode="RGBA"))
    bmp = io.BytesIO()
    Image.fromarray(skdata.astronaut()[100:130, 200:220]).save(bmp, "BMP")  # 20 x 30 px
    files["b_class/tiny.bmp"] = bmp.getvalue()
    g16 = (np.add.outer(np.arange(64), np.arange(80)) * 400).astype(np.uint16)
    files["b_class/gray16.png"] = _png(Image.fromarray(g16))
    good = _jpeg(Image.fromarray(skdata.rocket()))
    files["c/truncated.jpg"] = good[: len(good) // 2]
    files["c/empty.jpg"] = b""
    files["c/text.jpg"] = b"this is not an image, just some text\n"
    la = np.dstack([skdata.camera()[:100, :120], np.full((100, 120), 200, np.uint8)])
    files["c/sub/la.png"] = _png(Image.fromarray(la, mode="LA"))
    files["c/UPPER.JPG"] = _jpeg(Image.fromarray(skdata.rocket()[:300, :300]))
    files["c/notes.txt"] = b"not listed: wrong extension"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return {"root": root, "files": files}


def test_imagefolder_matches_torchvision(folder):
    tv = pytest.importorskip("torchvision.datasets")
    src = ImageFolderSource(folder["root"])
    ref = tv.ImageFolder(str(folder["root"]))
    assert src.class_names == ref.classes == ["A_class", "b_class", "c"]
    assert src.paths == [p for p, _ in ref.samples]
    assert src.labels == [t for _, t in ref.samples]
    assert src.keys == [os.path.relpath(p, folder["root"]).replace(os.sep, "/") for p, _ in ref.samples]
    assert "c/notes.txt" not in src.keys and "c/UPPER.JPG" in src.keys and "c/sub/la.png" in src.keys
    assert len(src) == 12
    for row, key in enumerate(src.keys):
        assert src.read_bytes(row) == folder["files"][key]
    d = src.describe()
    assert d["type"] == "imagefolder" and d["num_samples"] == 12 and d["num_classes"] == 3


def test_decode_reasons_and_rgb_outputs(folder):
    src = ImageFolderSource(folder["root"])
    ds = DecodeDataset(src, 256)
    items = {src.keys[it["row"]]: it for it in (ds[i] for i in range(len(ds)))}
    assert items["c/empty.jpg"]["reason"] == "empty file"
    assert items["c/text.jpg"]["reason"] == "not an image: cannot identify image file"
    assert items["c/truncated.jpg"]["reason"].startswith("truncated image: ")
    bad = {"c/empty.jpg", "c/text.jpg", "c/truncated.jpg"}
    for key, it in items.items():
        assert it["image"].dtype == torch.uint8 and tuple(it["image"].shape) == (3, 256, 256), key
        if key in bad:
            assert it["ok"] is False and int(it["image"].sum()) == 0
        else:
            assert it["ok"] is True and it["reason"] == "", (key, it["reason"])
            assert it["image"].float().std() > 1.0, key  # real content, not a blank
    # the error carries the name too
    with pytest.raises(DecodeError, match=r"^c/empty.jpg: empty file$"):
        load_rgb(b"", "c/empty.jpg")


def test_colour_mode_rules(folder):
    files = folder["files"]
    # L -> three equal channels, values unchanged
    cam = skdata.camera()
    assert np.array_equal(np.asarray(load_rgb(files["A_class/gray.png"])), np.dstack([cam] * 3))
    # P with transparency -> palette colours (alpha dropped, as REPA's convert("RGB"))
    pal_im = _palette_image()
    idx = np.asarray(pal_im)
    lut = np.array([[(i * 37) % 256, (i * 91) % 256, (i * 13) % 256] for i in range(256)], np.uint8)
    assert np.array_equal(np.asarray(load_rgb(files["b_class/palette.png"])), lut[idx])
    # RGBA / LA -> colour channels, alpha dropped
    rgba = np.asarray(Image.open(io.BytesIO(files["b_class/rgba.png"])))
    assert np.array_equal(np.asarray(load_rgb(files["b_class/rgba.png"])), rgba[..., :3])
    la = np.asarray(Image.open(io.BytesIO(files["c/sub/la.png"])))
    assert np.array_equal(np.asarray(load_rgb(files["c/sub/la.png"])), np.dstack([la[..., 0]] * 3))
    # 16-bit grey is scaled, not clipped: v * 255 / 65535
    g16 = (np.add.outer(np.arange(64), np.arange(80)) * 400).astype(np.uint16)
    exp16 = np.rint(g16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    out16 = np.asarray(load_rgb(files["b_class/gray16.png"]))
    assert np.array_equal(out16, np.dstack([exp16] * 3)) and out16.max() > 200
    # float images in [0, 1] are scaled by 255
    f = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    b = io.BytesIO()
    Image.fromarray(f, mode="F").save(b, "TIFF")
    assert np.array_equal(np.asarray(load_rgb(b.getvalue()))[..., 1], np.rint(f * 255).astype(np.uint8))
    # CMYK decodes to RGB like PIL's convert
    cmyk = Image.open(io.BytesIO(files["A_class/cmyk.jpg"]))
    assert cmyk.mode == "CMYK"
    assert np.array_equal(np.asarray(load_rgb(files["A_class/cmyk.jpg"])), np.asarray(cmyk.convert("RGB")))


def test_load_truncated_is_not_global():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = _jpeg(Image.fromarray(skdata.rocket()))
    for cut in (len(good) // 2, 400):
        with pytest.raises(DecodeError) as ei:
            load_rgb(good[:cut])
        assert ei.value.reason.startswith("truncated image: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _adm_reference(arr: np.ndarray, size: int) -> np.ndarray:
    """The ADM crop written out differently: count the halvings first, sizes by integer math,
    crop by numpy slicing."""
    im = Image.fromarray(arr)
    h, w = arr.shape[:2]
    halvings = 0
    while min(w >> halvings, h >> halvings) >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        im = im.resize((im.width // 2, im.height // 2), Image.Resampling.BOX)
    short = min(im.size)
    tw, th = int(im.width * size / short + 0.5), int(im.height * size / short + 0.5)
    a = np.asarray(im.resize((tw, th), Image.Resampling.BICUBIC))
    y0, x0 = (th - size) // 2, (tw - size) // 2
    return a[y0:y0 + size, x0:x0 + size]


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("hw", [(700, 1100), (30, 20), (300, 451), (1030, 513), (512, 512), (256, 300)])
def test_center_crop_adm_matches_reference(size, hw):
    src = np.asarray(Image.fromarray(skdata.astronaut()).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    out = np.asarray(center_crop_adm(Image.fromarray(src), size))
    assert out.shape == (size, size, 3)
    assert np.array_equal(out, _adm_reference(src, size))


def test_center_crop_adm_known_pixels():
    # no resize needed (short side == size): a pure centre crop, offset (300 - 256) // 2 = 22
    rows = np.repeat((np.arange(300) // 2).astype(np.uint8)[:, None], 256, axis=1)
    out = np.asarray(center_crop_adm(Image.fromarray(rows, mode="L"), 256))
    assert np.array_equal(out[:, 0], np.arange(22, 278) // 2)
    # 1024 -> BOX halving twice averages aligned 4x4 blocks exactly
    i = np.arange(1024) // 4
    blocks = ((i[:, None] + i[None, :]) % 256).astype(np.uint8)
    out = np.asarray(center_crop_adm(Image.fromarray(blocks, mode="L"), 256))
    j = np.arange(256)
    assert np.array_equal(out, (j[:, None] + j[None, :]) % 256)
    # a tiny constant image is upsampled by bicubic (weights sum to one) and stays constant
    out = np.asarray(center_crop_adm(Image.new("RGB", (20, 30), (77, 5, 200)), 256))
    assert out.shape == (256, 256, 3) and (out == np.array([77, 5, 200], np.uint8)).all()


def _write_tars(folder, tmp_path, drop_cls_for=None, dup_into_second=False) -> list[Path]:
    src = ImageFolderSource(folder["root"])
    paths = [tmp_path / "shard-000.tar", tmp_path / "shard-001.tar"]
    half = 7
    for si, p in enumerate(paths):
        rows = range(0, half) if si == 0 else range(half, len(src))
        if dup_into_second and si == 1:
            rows = [0, *rows]
        with tarfile.open(p, "w") as tf:
            for r in rows:
                key = src.keys[r].rsplit(".", 1)[0]
                ext = src.keys[r].rsplit(".", 1)[1]
                members = [(f"{key}.{ext}", src.read_bytes(r))]
                if key != drop_cls_for:
                    members.append((f"{key}.cls", str(src.labels[r]).encode()))
                for name, data in members:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return paths


def test_webdataset_and_filelist_agree_with_imagefolder(folder, tmp_path):
    ref = ImageFolderSource(folder["root"])
    _write_tars(folder, tmp_path)
    wds = WebDatasetSource(str(tmp_path / "shard-{000..001}.tar"))
    assert wds.keys == [k.rsplit(".", 1)[0] for k in ref.keys]
    assert wds.labels == ref.labels and wds.class_names == ["0", "1", "2"]
    assert [wds.read_bytes(r) for r in range(len(wds))] == [ref.read_bytes(r) for r in range(len(ref))]
    assert len(wds.describe()["shards"]) == 2

    lst = tmp_path / "list.txt"
    lines = ["# comment", ""] + [f"{k}\t{lab}" for k, lab in zip(ref.keys, ref.labels)]
    lst.write_text("\n".join(lines) + "\n")
    fl = FileListSource(lst, root=folder["root"])
    assert fl.keys == ref.keys and fl.labels == ref.labels
    assert [fl.read_bytes(r) for r in range(len(fl))] == [ref.read_bytes(r) for r in range(len(ref))]
    # class-name labels map in sorted order, i.e. like ImageFolder
    named = tmp_path / "named.txt"
    named.write_text("".join(f"{folder['root'] / k}\t{k.split('/')[0]}\n" for k in ref.keys))
    fn = FileListSource(named)
    assert fn.labels == ref.labels and fn.class_names == ref.class_names


def test_decode_dataset_dataloader_two_workers(folder, tmp_path):
    _write_tars(folder, tmp_path)
    wds = WebDatasetSource([tmp_path / "shard-000.tar", tmp_path / "shard-001.tar"])
    ds = DecodeDataset(wds, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_decoded)
    batches = list(loader)
    rows = torch.cat([b["row"] for b in batches])
    assert rows.tolist() == list(range(len(wds)))
    images = torch.cat([b["image"] for b in batches])
    oks = torch.cat([b["ok"] for b in batches])
    reasons = sum((b["reason"] for b in batches), [])
    assert images.dtype == torch.uint8 and tuple(images.shape) == (12, 3, 64, 64) and oks.dtype == torch.bool
    for r in range(len(wds)):  # same as decoding in this process
        it = ds[r]
        assert torch.equal(images[r], it["image"]) and bool(oks[r]) == it["ok"] and reasons[r] == it["reason"]
    assert sorted(k for k, ok in zip(wds.keys, oks.tolist()) if not ok) == ["c/empty", "c/text", "c/truncated"]


def test_source_errors(folder, tmp_path):
    # duplicate keys are named
    lst = tmp_path / "dups.txt"
    lst.write_text("a/x.jpg\na/y.jpg\na/x.jpg\n")
    with pytest.raises(SourceError, match=r"duplicate sample keys: 'a/x.jpg'"):
        FileListSource(lst)
    d = tmp_path / "dup"
    d.mkdir()
    _write_tars(folder, d, dup_into_second=True)
    with pytest.raises(SourceError, match=r"duplicate sample keys: 'A_class/cmyk'"):
        WebDatasetSource(str(d / "shard-{000..001}.tar"))
    # partial labels
    part = tmp_path / "part.txt"
    part.write_text("a.jpg\t1\nb.jpg\n")
    with pytest.raises(SourceError, match=r"line 2 .*'b.jpg'.* has no label"):
        FileListSource(part)
    d2 = tmp_path / "nocls"
    d2.mkdir()
    _write_tars(folder, d2, drop_cls_for="b_class/rgba")
    with pytest.raises(SourceError, match=r"1 of 12 samples have no cls member \(first: 'b_class/rgba'\)"):
        WebDatasetSource([d2 / "shard-000.tar", d2 / "shard-001.tar"])
    # compressed tar and missing shard
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        ti = tarfile.TarInfo("a.jpg")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(SourceError, match="uncompressed tar"):
        WebDatasetSource([str(gz)])
    with pytest.raises(SourceError, match="file not found"):
        WebDatasetSource(str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(SourceError, match="only local tar files"):
        WebDatasetSource("pipe:curl -s http://x/shard-0.tar")
    # empty class folder
    e = tmp_path / "emptyclass"
    (e / "a").mkdir(parents=True)
    (e / "b").mkdir()
    (e / "a" / "x.png").write_bytes(b"")
    with pytest.raises(SourceError, match=r"in class folder\(s\) b"):
        ImageFolderSource(e)


def test_unlabelled_list_and_open_source(folder, tmp_path):
    fl = FileListSource([str(folder["root"] / "A_class/gray.png"), str(folder["root"] / "c/UPPER.JPG")])
    assert fl.labels == [0, 0] and fl.class_names == ["unlabeled"]
    assert fl.read_bytes(1) == folder["files"]["c/UPPER.JPG"]
    assert isinstance(open_source(folder["root"]), ImageFolderSource)
    _write_tars(folder, tmp_path)
    assert isinstance(open_source(str(tmp_path / "shard-{000..001}.tar")), WebDatasetSource)
    assert isinstance(open_source(str(tmp_path / "shard-000.tar")), WebDatasetSource)
    assert isinstance(open_source([str(tmp_path / "shard-000.tar")]), WebDatasetSource)
    lst = tmp_path / "l.txt"
    lst.write_text(str(folder["root"] / "A_class/gray.png") + "\n")
    assert isinstance(open_source(lst), FileListSource)
    with pytest.raises(SourceError, match="no such file or directory"):
        open_source(tmp_path / "nope")
    (tmp_path / "weird.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="cannot tell the source type"):
        open_source(tmp_path / "weird.bin")
    assert open_source(None).root == default_sample_source().root


def test_bundled_sample_images_decode():
    src = default_sample_source()
    assert len(src) == 10 and src.class_names == ["animals", "people", "things"]
    assert src.labels == sorted(src.labels) and set(src.labels) == {0, 1, 2}
    ds = DecodeDataset(src, 256)
    for i in range(len(ds)):
        it = ds[i]
        assert it["ok"], (src.keys[i], it["reason"])
        assert tuple(it["image"].shape) == (3, 256, 256)

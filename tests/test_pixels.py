"""Pixel stores: `irepa-cache build --pixels [--vae none]` keeps the exact ADM crop the encoders saw,
both backends and every pixel codec, flips made on the fly, checksums, verify, inspect,
--latents-from, int8 features, and the refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from irepa.pipeline.build import build_store
from irepa.pipeline.build_config import BuildConfig
from irepa.pipeline.config import OptionError
from irepa.pipeline.encoders import load_encoder
from irepa.pipeline.transforms import decode_and_crop
from irepa.stores import (DamagedData, StoreError, StoreLayout, StoreWriter, describe_store, format_description,
                          open_store, verify_store)
from irepa.stores.backends.zarr import ShardedRows, chunk_file
from irepa.stores.testing import make_synthetic_store

TINY = dict(encoder="dinov2-vit-s", encoder_config="tiny", num_workers=0, progress=False, device="cpu",
            resolution=64, shard_size=3, batch_size=2)
R = 64


def _photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """Two classes of images in several modes and sizes (converted and cropped by the build), one
    truncated file (skipped)."""
    root = tmp_path_factory.mktemp("images")
    specs = {"a": [("1.jpg", "RGB", (90, 70)), ("2.png", "L", (64, 64)), ("3.jpg", "CMYK", (150, 100))],
             "b": [("1.png", "P", (50, 80)), ("2.png", "RGBA", (128, 128)), ("3.jpg", "RGB", (20, 30))]}
    seed = 0
    for cls, files in specs.items():
        (root / cls).mkdir()
        for name, mode, size in files:
            seed += 1
            im = Image.fromarray(_photo(seed, size))
            im.convert(mode).save(root / cls / name) if mode != "RGB" else im.save(root / cls / name, quality=90)
    buf = io.BytesIO()
    Image.fromarray(_photo(99, (80, 80))).save(buf, format="JPEG")
    (root / "b" / "4.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def stores(image_tree, tmp_path_factory) -> dict[str, Path]:
    """Pixel-only stores with flips: zarr raw, zarr zstd, webdataset png with int8 features."""
    base = tmp_path_factory.mktemp("built")
    out = {}
    for name, kw in {"zarr": {}, "zarr-zstd": {"pixel_codec": "zstd"},
                     "wds-png-int8": {"format": "wds", "pixel_codec": "png", "feature_dtype": "int8"}}.items():
        out[name] = build_store(data=str(image_tree), out=str(base / name), pixels=True, vae="none", flip=True,
                                **TINY, **kw)
    return out


def _all_samples(store) -> list[dict]:
    r = open_store(store)
    return [s for shard in range(r.num_shards) for s in r.iter_shard(shard)]


def _crop(image_tree: Path, key: str) -> np.ndarray:
    return decode_and_crop((image_tree / key).read_bytes(), R).transpose(2, 0, 1)


# ----------------------------------------------------------------------------- what is stored


def test_pixels_are_the_adm_crop_byte_for_byte(image_tree, stores):
    for name, path in stores.items():
        samples = _all_samples(path)
        assert len(samples) == 6, name  # the truncated JPEG is skipped
        for s in samples:
            assert s["pixels"].dtype == np.uint8 and s["pixels"].shape == (3, R, R)
            assert np.array_equal(s["pixels"], _crop(image_tree, s["key"])), (name, s["key"])
    # zarr-python reads the same bytes (raw rows and zarr's zstd codec alike)
    for name in ("zarr", "zarr-zstd"):
        r = open_store(stores[name])
        got = np.asarray(zarr.open_group(str(stores[name]), mode="r")["pixels"][:])
        assert np.array_equal(got[r.rows], r.get_batch(range(len(r)))["pixels"]), name


def test_features_are_the_encoder_applied_to_the_stored_pixels(stores):
    enc = load_encoder("dinov2-vit-s", resolution=R, pretrained=False, config="tiny").eval()
    for name, path in stores.items():
        samples = _all_samples(path)
        px = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
        with torch.no_grad():
            ref, ref_flip = enc(px)[0].numpy(), enc(px.flip(-1))[0].numpy()
        for got, want in ((np.stack([s["features"]["dinov2-vit-s"] for s in samples]), ref),
                          (np.stack([s["features_flip"]["dinov2-vit-s"] for s in samples]), ref_flip)):
            # fp16 storage (int8: half a quantisation step of the token's max)
            tol = np.abs(want).max(-1, keepdims=True) / (254 if "int8" in name else 500)
            assert (np.abs(got - want) <= tol + 1e-6).all(), name


def test_manifest_inspect_and_verify_of_a_pixel_only_store(stores):
    m = json.loads((stores["zarr-zstd"] / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["vae"] is None and m["latent_shape"] is None
    assert m["latents_from"] is None and m["latent_stats"] is None and "latents" not in m["arrays"]
    assert m["arrays"]["pixels"] == {"shape": [7, 3, R, R], "dtype": "uint8"}  # one row per input, skipped included
    assert m["pixels"] == {"shape": [3, R, R], "dtype": "uint8", "order": "CHW", "codec": "zstd", "crop": "adm",
                           "flip": "not stored: readers mirror the stored crop for the flipped view"}
    assert "flip/pixels" not in m["arrays"] and m["build_args"]["vae"] == "none"
    r = open_store(stores["zarr-zstd"])
    assert r.latent_shape is None and r.pixel_shape == (3, R, R) and r.pixel_codec == "zstd"
    assert "latents" not in r.get_batch([0])
    with pytest.raises(StoreError, match="holds no latents .*--vae none"):
        r.get_batch([0], with_latents=True)
    text = format_description(describe_store(stores["wds-png-int8"]))
    assert "none (a pixel-only store, built with --vae none)" in text
    assert "pixels: adm crop as the encoders saw it, uint8 CHW, codec png" in text and "vae: none (no latents)" in text
    for path in stores.values():
        assert verify_store(path).ok
    # a store without pixels keeps the manifest it always had (no "pixels" field)
    plain = make_synthetic_store(stores["zarr"].parent / "plain", num_samples=4)
    assert "pixels" not in json.loads((plain / "manifest.json").read_text()) and open_store(plain).pixel_shape is None


def test_pixel_codecs_write_the_bytes_zarr_writes(tmp_path):
    """Our shard encoder (raw and zstd rows, and the 1-byte arrays that now take the fast path) gives
    the bytes zarr itself writes for the same array metadata."""
    for codec, dtype in (("none", "float16"), ("zstd", "int8")):
        p = make_synthetic_store(tmp_path / codec, num_samples=6, shard_size=4, latent_channels=0, pixel_hw=(8, 8),
                                 pixel_codec=codec, feature_dtype=dtype, skipped_rows=[1])
        assert ShardedRows.from_metadata(p, "pixels").zstd == (3 if codec == "zstd" else None)
        assert ShardedRows.from_metadata(p, "features/tiny") is not None  # int8 too: direct reads
        g = zarr.open_group(str(p), mode="r+")
        for name in ("pixels", "features/tiny"):
            a = g[name]
            values = np.asarray(a[:])
            shard_file = p / chunk_file(name, a.ndim, 0)
            ours = shard_file.read_bytes()
            a[:] = values  # zarr rewrites every shard from the same values
            assert shard_file.read_bytes() == ours, (codec, name)


def test_damaged_pixels_are_named(tmp_path):
    for fmt, codec in (("zarr", "none"), ("zarr", "zstd"), ("wds", "none"), ("wds", "png")):
        p = make_synthetic_store(tmp_path / f"{fmt}-{codec}", num_samples=4, shard_size=4, latent_channels=0,
                                 pixel_hw=(8, 8), pixel_codec=codec, format=fmt)
        if fmt == "zarr":
            f = p / "pixels" / "c" / "0" / "0" / "0" / "0"
            data = bytearray(f.read_bytes())
            data[10] ^= 0xFF  # inside row 0
            f.write_bytes(bytes(data))
            with pytest.raises(DamagedData, match=r"array 'pixels' row 0: .*crc32c") as e:
                open_store(p).get_batch([0, 1])
        else:
            f = p / "shard-000000.tar"
            data = bytearray(f.read_bytes())
            member = b"000000000.pixels." + (b"png" if codec == "png" else b"npy")
            at = data.index(member) + 512 + (60 if codec == "png" else 200)  # inside the payload, past any header
            data[at] ^= 0xFF
            f.write_bytes(bytes(data))
            with pytest.raises(DamagedData, match=r"member '000000000\.pixels\.(png|npy)'.*crc32c") as e:
                _all_samples(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
        assert not verify_store(p).ok and 0 in verify_store(p).bad_shards
        # skip mode leaves the sample out and reports it
        r = open_store(p, on_damage="skip")
        got = r.get_batch([0, 1, 2]) if fmt == "zarr" else {"index": [s["index"] for s in r.iter_shard(0)]}
        assert list(got["index"]) == ([1, 2] if fmt == "zarr" else [1, 2, 3]) and len(r.damaged) == 1


# ----------------------------------------------------------------------------- flips in the loader


@pytest.mark.parametrize("fmt,codec", [("zarr", "none"), ("wds", "png")])
def test_loader_mirrors_pixels_for_the_flipped_view(tmp_path, fmt, codec):
    from irepa.trainer.data import LoaderSpec, StoreLoader, epoch_flips

    p = make_synthetic_store(tmp_path / "s", num_samples=16, encoders={"e": 8}, grid=(2, 2), shard_size=4,
                             flip=True, latent_channels=4, latent_hw=(2, 2), pixel_hw=(8, 8), pixel_codec=codec,
                             format=fmt)
    r = open_store(p)
    stored = {s["index"]: s for shard in range(r.num_shards) for s in r.iter_shard(shard)}
    spec = LoaderSpec(global_batch=8, seed=5, flip=True, shuffle_buffer=4)
    loader = StoreLoader(p, kind=r.loader_kind, num_samples=16, spec=spec, encoders=["e"], steps=2,
                         shard_counts=r.shard_sample_counts(), inputs=("pixels",))
    flips = epoch_flips(16, 5, 0)
    seen = []
    it = iter(loader)  # a webdataset stream is endless: take the two steps of epoch 0
    for b in (next(it), next(it)):
        assert set(b) == {"index", "label", "features", "pixels", "damaged"}  # no latents asked for
        assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (8, 3, 8, 8)
        for j, i in enumerate(b["index"].tolist()):
            s, f = stored[i], bool(flips[i])
            want = s["pixels"][..., ::-1] if f else s["pixels"]
            assert np.array_equal(b["pixels"][j].numpy(), want), (i, f)
            feats = (s["features_flip"] if f else s["features"])["e"]
            assert np.array_equal(b["features"]["e"][j].numpy(), feats.astype(np.float16))
            seen.append(f)
    assert len(seen) == 16 and any(seen) and not all(seen)
    # a store with latents and pixels serves a latent objective too: latents only, as before
    both = StoreLoader(p, kind=r.loader_kind, num_samples=16, spec=spec, encoders=["e"], steps=1,
                       shard_counts=r.shard_sample_counts(), inputs=("latents", "pixels"))
    b = next(iter(both))
    assert b["latents"].shape == (8, 8, 2, 2) and b["pixels"].shape == (8, 3, 8, 8)


# ----------------------------------------------------------------------------- --latents-from


def test_latents_from_between_pixel_and_latent_stores(image_tree, stores, tmp_path):
    lat = build_store(data=str(image_tree), out=str(tmp_path / "lat"), vae="tiny", flip=True, **TINY)
    px = build_store(data=str(image_tree), out=str(tmp_path / "px"), pixels=True, latents_from=str(lat), flip=True,
                     **TINY)
    r = open_store(px)
    assert r.latent_shape == (8, 8, 8) and r.pixel_shape == (3, R, R) and "latents" not in r.manifest["arrays"]
    b = r.get_batch([0, 1], flip=[False, True])
    ref = open_store(lat).get_batch([0, 1], flip=[False, True])
    assert np.array_equal(b["latents"], ref["latents"])
    assert np.array_equal(b["pixels"][1], _crop(image_tree, b["key"][1])[..., ::-1])
    # a pixel store that borrows latents can itself lend nothing; a pixel-only store neither
    with pytest.raises(StoreError, match="holds no latents .*--vae none"):
        build_store(data=str(image_tree), out=str(tmp_path / "x"), latents_from=str(stores["zarr"]), **TINY)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- refusals


def test_options_and_layouts_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(OptionError, match="--vae none stores no latents; add --pixels"):
        BuildConfig(vae="none")
    with pytest.raises(OptionError, match="--vae none .* --latents-from .* contradict"):
        BuildConfig(vae="none", pixels=True, latents_from="stores/x")
    with pytest.raises(OptionError, match="--pixel-codec png is not available with --format zarr \\(it has none, zstd\\)"):
        BuildConfig(pixels=True, pixel_codec="png")
    with pytest.raises(OptionError, match="--pixel-codec zstd needs --pixels"):
        BuildConfig(pixel_codec="zstd")
    with pytest.raises(StoreError, match="must hold pixels"):
        StoreLayout(num_rows=2, shard_size=2, latent_channels2=0, latent_hw=(0, 0))
    layout = StoreLayout(num_rows=2, shard_size=2, latent_channels2=0, latent_hw=(0, 0), pixel_hw=(4, 4),
                         pixel_codec="zstd")
    with pytest.raises(StoreError, match="pixel codec 'zstd' is not available in the wds backend"):
        StoreWriter.open(tmp_path / "w", "wds", layout, ["a", "b"], [0, 1], {})
    w = StoreWriter.open(tmp_path / "z", "zarr", layout, ["a", "b"], [0, 1], {})
    with pytest.raises(StoreError, match="array 'pixels' must be uint8"):
        w.write_shard(0, {"pixels": np.zeros((2, 3, 4, 4), np.float32)})


def test_latent_objectives_refuse_a_pixel_only_store_clearly(stores, tmp_path):
    from irepa.trainer.cli import train
    from irepa.trainer.store_checks import StoreMismatchError

    kw = dict(cache=str(stores["zarr"]), model="SiT-S/2", hidden_size=32, depth=2, num_heads=2, steps=1,
              batch_size=2, num_workers=0, progress=False, device="cpu")
    with pytest.raises((StoreMismatchError, ValueError)) as e:
        train(out=str(tmp_path / "flow"), **kw)
    assert f"store {stores['zarr']} has none (a pixel-only store" in str(e.value) and "--objective jit" in str(e.value)
    with pytest.raises((StoreMismatchError, ValueError)) as e:
        train(out=str(tmp_path / "mf"), objective="meanflow", **kw)
    assert str(stores["zarr"]) in str(e.value) and "a pixel-only store" in str(e.value)

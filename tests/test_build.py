"""`irepa-cache build | inspect | verify` end to end on a generated ImageFolder with tiny models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from irepa.pipeline.build import build_store
from irepa.pipeline.cli import verify as verify_cmd
from irepa.pipeline.encoders import load_encoder
from irepa.pipeline.transforms import decode_and_crop
from irepa.pipeline.vae import load_vae
from irepa.stores import StoreError, open_store, verify_store

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu")
ENCODERS = "dinov2-vit-b,siglip-vit-b"


def _photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """Three classes, mixed sizes and modes, plus a truncated JPEG, an empty file and a text file."""
    root = tmp_path_factory.mktemp("imagenet")
    specs = {
        "n01_cat": [("a.jpg", "RGB", (300, 220)), ("b.png", "L", (256, 256)), ("c.JPEG", "CMYK", (640, 480))],
        "n02_dog": [("a.png", "P", (200, 330)), ("b.png", "RGBA", (512, 512)), ("c.jpg", "RGB", (40, 30))],
        "n03_eel": [("a.jpg", "RGB", (1100, 700)), ("b.bmp", "RGB", (257, 300))],
    }
    seed = 0
    for cls, files in specs.items():
        (root / cls).mkdir()
        for name, mode, size in files:
            seed += 1
            im = Image.fromarray(_photo(seed, size))
            im = im.convert(mode) if mode != "RGB" else im
            im.save(root / cls / name)
    good = io.BytesIO()
    Image.fromarray(_photo(99, (320, 320))).save(good, format="JPEG", quality=90)
    (root / "n02_dog" / "d_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "n03_eel" / "c_empty.jpg").write_bytes(b"")
    (root / "n03_eel" / "d_text.jpg").write_text("this is not an image\n")
    return root


def expected_listing(root: Path) -> list[tuple[str, int]]:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), loader=lambda p: p, is_valid_file=lambda p: True)
    return [(os.path.relpath(p, root), label) for p, label in ds.samples]


@pytest.fixture(scope="module")
def zarr_store(image_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "tiny"
    build_store(data=str(image_tree), out=str(out), encoder=ENCODERS, shard_size=3, batch_size=2, **TINY)
    return out


def test_build_counts_labels_keys_and_skips(image_tree, zarr_store):
    listing = expected_listing(image_tree)
    bad = {"n02_dog/d_truncated.jpg": "truncated", "n03_eel/c_empty.jpg": "empty", "n03_eel/d_text.jpg": "not an image"}
    store = open_store(zarr_store)
    good = [(k, lab) for k, lab in listing if k not in bad]
    assert len(store) == len(good) == 8
    assert store.manifest["num_rows"] == len(listing) == 11
    batch = store.get_batch(range(len(store)))
    assert batch["key"] == [k for k, _ in good]
    assert batch["label"].tolist() == [lab for _, lab in good]
    skipped = {s["key"]: s for s in store.manifest["skipped"]}
    assert set(skipped) == set(bad)
    for key, words in bad.items():
        assert words in skipped[key]["reason"], skipped[key]
        assert skipped[key]["row"] == [k for k, _ in listing].index(key)
    assert store.encoders == ["dinov2-vit-b", "siglip-vit-b"]
    assert store.token_grid == (16, 16)
    assert store.latent_shape == (8, 32, 32)


def test_stored_values_equal_direct_model_calls(image_tree, zarr_store):
    store = open_store(zarr_store)
    keys = store.get_batch(range(len(store)))["key"]
    pick = [0, 3, len(store) - 1]
    images = torch.stack(
        [torch.from_numpy(decode_and_crop((image_tree / keys[i]).read_bytes(), 256).copy()).permute(2, 0, 1) for i in pick]
    )
    vae = load_vae("tiny").eval()
    with torch.no_grad():
        mean, std = vae.encode(images)
    batch = store.get_batch(pick)
    np.testing.assert_allclose(batch["latents"], torch.cat([mean, std], 1).numpy(), rtol=1e-5, atol=1e-5)
    for name in store.encoders:
        enc = load_encoder(name, resolution=256, pretrained=False, config="tiny").eval()
        with torch.no_grad():
            tokens, _ = enc(images)
        ref = tokens.numpy()
        # float16 storage: relative error of half precision
        np.testing.assert_allclose(batch["features"][name], ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_zarr_store_opens_with_plain_zarr(zarr_store):
    group = zarr.open_group(str(zarr_store), mode="r")
    assert group["latents"].shape == (11, 8, 32, 32)
    assert group["features/dinov2-vit-b"].shape == (11, 256, 64)
    assert group["features/dinov2-vit-b"].dtype == np.float16
    labels = group["labels"][:]
    assert (labels == -1).sum() == 3
    assert str(group["keys"][0]).startswith("n01_cat/")
    # sharded: one file per shard per array, not one per sample
    shard_files = [p for p in (zarr_store / "latents").rglob("*") if p.is_file() and p.name != "zarr.json"]
    # ceil(11 / 3) = 4 shards; the last holds only rows 9 and 10 (the empty file and the text
    # file), all fill value, which zarr does not write
    assert sorted(p.relative_to(zarr_store / "latents").parts[1] for p in shard_files) == ["0", "1", "2"]


def test_wds_store_opens_with_plain_tarfile(image_tree, tmp_path):
    out = tmp_path / "wds"
    build_store(data=str(image_tree), out=str(out), encoder="dinov2-vit-b", shard_size=4, batch_size=4,
                format="wds", **TINY)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 3
    keys = []
    for t in tars:
        with tarfile.open(t) as tf:
            names = tf.getnames()
            keys += [tf.extractfile(n).read().decode() for n in names if n.endswith(".key.txt")]
            lat = [n for n in names if n.endswith(".latents.npy")]
            arr = np.load(io.BytesIO(tf.extractfile(lat[0]).read()), allow_pickle=False)
            assert arr.shape == (8, 32, 32)
    assert len(keys) == 8
    store = open_store(out)
    seq = [s for shard in range(store.num_shards) for s in store.iter_shard(shard)]
    assert [s["key"] for s in seq] == keys
    ref = open_store(out)  # random access is zarr only, with a clear message
    with pytest.raises(StoreError, match="zarr"):
        ref.get_batch([0])


def test_int8_and_flip(image_tree, zarr_store, tmp_path):
    out = tmp_path / "int8flip"
    build_store(data=str(image_tree), out=str(out), encoder="dinov2-vit-b", shard_size=4, batch_size=4,
                feature_dtype="int8", flip=True, **TINY)
    store, ref = open_store(out), open_store(zarr_store)
    a = store.get_batch(range(len(store)))["features"]["dinov2-vit-b"]
    b = ref.get_batch(range(len(ref)))["features"]["dinov2-vit-b"]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.mean() > 0.999 and cos.min() > 0.99
    # the flipped view is the model run on the mirrored crop
    key = store.get_batch([2])["key"][0]
    img = torch.from_numpy(decode_and_crop((image_tree / key).read_bytes(), 256).copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean, std = load_vae("tiny").eval().encode(torch.flip(img, dims=[-1]))
    flipped = store.get_batch([2], flip=[True])
    np.testing.assert_allclose(flipped["latents"][0], torch.cat([mean, std], 1)[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(flipped["latents"], store.get_batch([2])["latents"])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


KILL_SCRIPT = """
import os, signal, sys
import irepa.stores.writer as w
orig = w.StoreWriter.write_shard
count = [0]
def write_then_die(self, shard, arrays, skipped):
    orig(self, shard, arrays, skipped)
    count[0] += 1
    if count[0] == int(sys.argv[3]):
        # a torn write of the next shard's file, then a hard kill mid-build
        os.kill(os.getpid(), signal.SIGKILL)
w.StoreWriter.write_shard = write_then_die
from irepa.pipeline.build import build_store
build_store(data=sys.argv[1], out=sys.argv[2], encoder="dinov2-vit-b", shard_size=2, batch_size=2,
            vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu")
"""


def _run_build_process(image_tree: Path, out: Path, kill_after_shards: int) -> subprocess.CompletedProcess:
    # every build of this test runs in a fresh process with the same thread count, so that float
    # reductions (and therefore bytes) do not depend on what earlier tests set in this process
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(image_tree), str(out), str(kill_after_shards)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_killed_build_resumes_to_identical_bytes(image_tree, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _run_build_process(image_tree, ref, 0).returncode == 0
    proc = _run_build_process(image_tree, killed, 3)
    assert proc.returncode == -9, proc.stderr
    done = sorted(p.name for p in (killed / "_progress").glob("*.json"))
    assert len(done) == 3
    with pytest.raises(StoreError, match="unfinished|building|not complete"):
        open_store(killed)
    # a crash mid-write leaves a stray temp file and garbage in a shard that has no record
    (killed / "latents" / "c" / "4.deadbeef.partial").parent.mkdir(parents=True, exist_ok=True)
    (killed / "latents" / "c" / "4.deadbeef.partial").write_bytes(b"garbage")
    (killed / "latents" / "c" / "4" / "0" / "0").mkdir(parents=True, exist_ok=True)
    (killed / "latents" / "c" / "4" / "0" / "0" / "0").write_bytes(b"torn shard")
    assert _run_build_process(image_tree, killed, 0).returncode == 0
    a, b = _tree_bytes(ref), _tree_bytes(killed)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs after resume"
    store = open_store(killed)
    keys = store.get_batch(range(len(store)))["key"]
    assert len(keys) == len(set(keys)) == 8


def test_verify_names_flipped_byte(zarr_store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(zarr_store, copy)
    assert verify_store(copy).ok
    shard = sorted(p for p in (copy / "features" / "siglip-vit-b").rglob("*") if p.is_file() and p.name != "zarr.json")[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_store(copy)
    assert not report.ok
    with pytest.raises(SystemExit) as exc:
        verify_cmd(str(copy))
    assert exc.value.code == 1
    text = capsys.readouterr().out
    assert "shard 1" in text and str(shard.relative_to(copy)) in text


def test_latents_from_checks_fingerprint(image_tree, zarr_store, tmp_path):
    other_tree = tmp_path / "other"
    (other_tree / "x").mkdir(parents=True)
    Image.fromarray(_photo(5, (256, 256))).save(other_tree / "x" / "one.png")
    with pytest.raises(StoreError) as err:
        build_store(data=str(other_tree), out=str(tmp_path / "bad"), encoder="dinov2-vit-b",
                    latents_from=str(zarr_store), **TINY)
    theirs = open_store(zarr_store).manifest["dataset"]["fingerprint"]
    assert theirs in str(err.value)
    from irepa.stores import dataset_fingerprint

    assert dataset_fingerprint(["x/one.png"]) in str(err.value)

    # same data: only the encoder runs, latents are read from the other store
    out = tmp_path / "borrow"
    build_store(data=str(image_tree), out=str(out), encoder="siglip-vit-b", shard_size=5, batch_size=3,
                latents_from=str(zarr_store), **TINY)
    assert open_store(out).manifest["shard_size"] == 3  # taken from the store that holds the latents
    assert not (out / "latents").exists()
    mine, theirs_store = open_store(out), open_store(zarr_store)
    np.testing.assert_array_equal(mine.get_batch([1, 4])["latents"], theirs_store.get_batch([1, 4])["latents"])
    np.testing.assert_array_equal(mine.get_batch([1, 4])["features"]["siglip-vit-b"],
                                  theirs_store.get_batch([1, 4])["features"]["siglip-vit-b"])
    from irepa.stores import describe_store, format_description

    text = format_description(describe_store(out))
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("latents ") and "read from" in ln)
    # the path is kept relative to the store, so the two can move together
    src = line.split("read from ", 1)[1].split(" (not stored here)")[0]
    assert (out / src).resolve() == zarr_store.resolve()


def test_torchrun_two_ranks_write_disjoint_shards(image_tree, tmp_path):
    args = ["build", "--data", str(image_tree), "--encoder", "dinov2-vit-b", "--vae", "tiny",
            "--encoder-config", "tiny", "--shard-size", "3", "--batch-size", "3", "--num-workers", "0",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same CPU thread count in both runs: same float sums
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(29510 + nproc), "-m", "irepa.pipeline.cli", *args, "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("store written") == 1  # rank 0 alone reports
        outputs[nproc] = _tree_bytes(out)
    assert outputs[1] == outputs[2]


def test_cli_help_and_demo_defaults(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "irepa.pipeline.cli", "build", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PAGER": "cat"})
    assert proc.returncode == 0
    helptext = proc.stdout + proc.stderr  # fire writes help to stderr when not on a terminal
    assert "--latents-from" in helptext and "--feature-dtype" in helptext
    out = tmp_path / "demo"
    build_store(out=str(out), num_workers=0, progress=False, device="cpu")
    store = open_store(out)
    assert len(store) == 10 and store.manifest["vae"]["id"] == "tiny"
    assert store.manifest["dataset"]["class_names"] == ["animals", "people", "things"]


def test_cli_user_errors_are_one_line_with_exit_2(zarr_store, tmp_path, capsys):
    from irepa.pipeline.cli import COMMANDS, run_fire

    before = _tree_bytes(zarr_store)
    with pytest.raises(SystemExit) as exc:
        run_fire(COMMANDS, "irepa-cache", ["build", "--out", str(zarr_store), "--noresume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("irepa-cache: error: store ") and "already exists" in err and "Traceback" not in err
    assert _tree_bytes(zarr_store) == before  # nothing already written is touched
    with pytest.raises(SystemExit) as exc:
        run_fire(COMMANDS, "irepa-cache", ["build", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "missing': no such file or directory" in capsys.readouterr().err


def test_parse_weights_forms_and_errors():
    from irepa.pipeline.build import parse_weights

    assert parse_weights("w.safetensors", ["dinov2-vit-b"]) == {"dinov2-vit-b": "w.safetensors"}
    assert parse_weights("a=x.pt,b=y.pt", ["a", "b"]) == {"a": "x.pt", "b": "y.pt"}
    assert parse_weights(("a=x.pt",), ["a", "b"]) == {"a": "x.pt"}
    assert parse_weights(None, ["a"]) == {}
    with pytest.raises(ValueError, match=r"--encoder-weights 'x.pt' is ambiguous with 2 encoders \['a', 'b'\]"):
        parse_weights("x.pt", ["a", "b"], flag="--encoder-weights")
    with pytest.raises(ValueError, match=r"--weights names \['c'\] that are not among the encoders"):
        parse_weights("c=z.pt", ["a", "b"])


def test_rerun_of_a_finished_build_loads_no_model(image_tree, zarr_store, monkeypatch, capsys):
    import irepa.pipeline.build as build_mod

    before = _tree_bytes(zarr_store)

    def no_models(*a, **k):
        raise AssertionError("a model was loaded for a finished store")

    monkeypatch.setattr(build_mod, "load_encoder", no_models)
    monkeypatch.setattr(build_mod, "load_vae", no_models)
    build_store(data=str(image_tree), out=str(zarr_store), encoder=ENCODERS, shard_size=3, batch_size=2, **TINY)
    assert "already complete" in capsys.readouterr().out
    assert _tree_bytes(zarr_store) == before
    # asking for something else goes through the full checks (and here, the models)
    with pytest.raises(AssertionError, match="a model was loaded"):
        build_store(data=str(image_tree), out=str(zarr_store), encoder="dinov2-vit-b", shard_size=3, **TINY)


def test_cli_interrupt_says_how_to_resume(capsys):
    from irepa.pipeline.cli import run_fire

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_fire({"build": interrupted}, "irepa-cache", ["build"])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err


def test_repair_rebuilds_damaged_shards_to_identical_bytes(image_tree, zarr_store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(zarr_store, copy)
    files = sorted(p for p in (copy / "latents").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(files[0].read_bytes())
    data[100] ^= 0xFF
    files[0].write_bytes(bytes(data))  # shard 0: a flipped byte
    victim = sorted(p for p in (copy / "features" / "siglip-vit-b").rglob("*") if p.is_file() and p.name != "zarr.json")[2]
    victim.unlink()  # shard 2: a deleted file
    assert sorted(verify_store(copy).bad_shards) == [0, 2]
    # a plain rerun trusts the completion records ...
    build_store(data=str(image_tree), out=str(copy), encoder=ENCODERS, shard_size=3, batch_size=2, **TINY)
    assert "already complete" in capsys.readouterr().out and not verify_store(copy).ok
    # ... --repair verifies, rewrites shards 0 and 2 only, and ends equal to the undamaged build
    build_store(data=str(image_tree), out=str(copy), encoder=ENCODERS, shard_size=3, batch_size=2, repair=True, **TINY)
    assert "shard(s) [0, 2]" in capsys.readouterr().out
    assert verify_store(copy).ok
    assert _tree_bytes(copy) == _tree_bytes(zarr_store)

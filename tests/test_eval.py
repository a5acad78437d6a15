"""irepa-eval: FID, sFID, Inception Score, precision/recall with the ADM suite's definitions.

The metric formulas are checked against closed forms and against numpy transcriptions of the ADM
evaluator's formulas written here; the whole pipeline runs the real torch-fidelity Inception class
random-initialised (no weights download) and is checked against features taken another way
(the Mixed_6d block output instead of our hook on its first branch) and numbers computed here with
numpy from the same features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa.pipeline import metrics_report as mr
from irepa.trainer import evaluate as ev
from irepa.trainer import fid as F
from irepa.trainer import inception as inc

RES = 32
N_SAMPLES = 8
N_REF = 6


# ----------------------------------------------------------------------------- helpers (numpy, written from ADM)


def _images(n: int, seed: int, shift: float) -> np.ndarray:
    """uint8 [n, RES, RES, 3]: blocky random colour layouts plus noise (features vary with them)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = np.kron(base, np.ones((1, RES // 4, RES // 4, 1), np.float32))
    return np.clip(up * 0.8 + shift + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


def _np_trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigen-decompositions only."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def _np_fid_stats(m1, s1, m2, s2) -> float:
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _np_trace_sqrt_product(s1, s2))


def _np_fid(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return _np_fid_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _np_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _np_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    ref, smp = ref.astype(np.float64), smp.astype(np.float64)

    def d2(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    r_ref = np.partition(d2(ref, ref), k, axis=1)[:, k]
    r_smp = np.partition(d2(smp, smp), k, axis=1)[:, k]
    precision = np.mean(np.any(d2(smp, ref) <= r_ref[None, :], axis=1))
    recall = np.mean(np.any(d2(ref, smp) <= r_smp[None, :], axis=1))
    return float(precision), float(recall)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- formulas


def test_sqrtm_product_against_scipy_and_eigen():
    from scipy import linalg

    rng = np.random.default_rng(0)
    for d in (2, 17, 64):
        s1, s2 = _spd(rng, d), _spd(rng, d)
        r = F.sqrtm_product(s1, s2)
        assert r.dtype == np.float64 and r.shape == (d, d)
        np.testing.assert_allclose(r @ r, s1 @ s2, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(r, np.real(linalg.sqrtm(s1 @ s2)), rtol=1e-10, atol=1e-12)
        assert np.trace(r) == pytest.approx(_np_trace_sqrt_product(s1, s2), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(1).standard_normal((400, 24)).astype(np.float32)
    mu, sigma = F.feature_statistics(feats)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_equals_closed_form_for_gaussians():
    rng = np.random.default_rng(2)
    d = 6
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    # diagonal covariances: |dm|^2 + sum (sqrt v1 - sqrt v2)^2
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert F.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)
    # commuting covariances S2 = c S1: |dm|^2 + tr(S1) (1 + c - 2 sqrt c)
    s1, c = _spd(rng, d), 2.7
    closed = ((m1 - m2) ** 2).sum() + np.trace(s1) * (1 + c - 2 * np.sqrt(c))
    assert F.frechet_distance(m1, s1, m2, c * s1) == pytest.approx(closed, rel=1e-9)
    # two sampled Gaussian feature sets: the statistics' FID approaches the population's
    n = 40000
    a = m1 + np.sqrt(v1) * rng.standard_normal((n, d))
    b = m2 + np.sqrt(v2) * rng.standard_normal((n, d))
    mu_a, s_a = F.feature_statistics(a)
    mu_b, s_b = F.feature_statistics(b)
    pop = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert F.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(pop, rel=0.03)


def test_fid_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="different lengths"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_equal_numpy():
    x = np.random.default_rng(3).standard_normal((37, 9)).astype(np.float32)
    mu, sigma = F.feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="at least 2"):
        F.feature_statistics(x[:1])


def test_inception_score_equals_adm_formula():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((12345, 11)) * 2.0  # 3 splits of 5000, the last one short
    assert F.inception_score(logits) == pytest.approx(_np_inception_score(logits), rel=1e-10)
    assert F.inception_score(logits, split_size=1000) == pytest.approx(_np_inception_score(logits, 1000), rel=1e-10)
    # identical predictions: IS 1; confident and uniform over K classes: IS K
    assert F.inception_score(np.tile(rng.standard_normal(7), (50, 1))) == pytest.approx(1.0, abs=1e-12)
    onehot = np.eye(5)[np.arange(500) % 5] * 60.0
    assert F.inception_score(onehot) == pytest.approx(5.0, rel=1e-6)


def test_precision_recall_hand_example():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    smp = np.array([[0.5], [6.0], [20.0], [14.0]])
    # ref radii (4th smallest squared distance, self included): 9, 4, 4, 9, 81 -> 20 is outside all
    np.testing.assert_array_equal(F.manifold_radii(ref).numpy(), [9, 4, 4, 9, 81])
    assert F.precision_recall(ref, smp) == (0.75, 1.0)


def test_precision_recall_equal_adm_transcription_with_ties():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((60, 8)).astype(np.float32)
    smp = (rng.standard_normal((45, 8)) * 1.3 + 0.4).astype(np.float32)
    ref[10] = ref[3]  # duplicates: a neighbour at distance 0
    smp[7] = smp[8] = smp[9]
    smp[20] = ref[5]  # a sample exactly on a reference point
    assert F.precision_recall(ref, smp) == pytest.approx(_np_precision_recall(ref, smp), abs=0)
    with pytest.raises(ValueError, match="more than k=3"):
        F.precision_recall(ref, smp[:3])


# ----------------------------------------------------------------------------- network


def test_missing_weights_is_one_line_naming_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("IREPA_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(inc.InceptionWeightsMissing) as err:
        inc.resolve_inception_weights(None)
    msg = str(err.value)
    assert "\n" not in msg and inc.INCEPTION_URL in msg and "--inception-weights" in msg
    with pytest.raises(inc.InceptionWeightsMissing, match="no such file"):
        inc.resolve_inception_weights(str(tmp_path / "nope.pth"))


def test_weights_file_loads_with_weights_only(tmp_path):
    net = inc.load_inception("random", "cpu", seed=3)
    path = tmp_path / "w.pth"
    torch.save(net.extractor.state_dict(), path)
    with pytest.warns(UserWarning, match="will not be comparable with the ADM suite"):
        loaded = inc.load_inception(str(path), "cpu")
    x = torch.from_numpy(_images(2, 9, 0)).permute(0, 3, 1, 2).contiguous()
    a, b = net(x), loaded(x)
    for k in ("pool", "spatial", "logits"):
        assert torch.equal(a[k], b[k])
    assert len(loaded.weights_sha256) == 64
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        inc.load_inception(str(tmp_path / "bad.pth"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One irepa-eval run (random-initialised Inception, CPU) with every metric and saved features."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "runs" / "sitb"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"cache": "stores/siglip", "encoders": ["siglip-vit-b"]}))
    samples, ref = _images(N_SAMPLES, 0, 0.0), _images(N_REF, 1, 25.0)
    np.savez(run_dir / "samples" / "samples.npz", arr_0=samples)
    np.savez(root / "ref.npz", arr_0=ref)
    cfg = ev.EvalConfig(samples=str(run_dir / "samples" / "samples.npz"), ref=str(root / "ref.npz"),
                        device="cpu", inception_weights="random", batch_size=3, progress=False,
                        save_features=str(root / "feats.npz"))
    result = ev.evaluate(cfg)
    with np.load(root / "feats.npz") as z:
        feats = {k: z[k] for k in z.files}
    return {"root": root, "result": result, "feats": feats, "samples": samples, "ref": ref, "cfg": cfg}


def _direct_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """The same random network called directly (torch-fidelity's forward, one batch), the spatial
    features from the Mixed_6d block output (its first 192 channels are branch1x1), NHWC in numpy."""
    net = inc.load_inception("random", "cpu")
    ext = net.extractor
    grabbed = {}
    hook = ext.Mixed_6d.register_forward_hook(lambda m, i, o: grabbed.__setitem__("mixed_6", o.detach().clone()))
    try:
        pool, logits = ext(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    finally:
        hook.remove()
    mixed = grabbed["mixed_6"].numpy()  # [N, 768, 17, 17]
    spatial = np.transpose(mixed[:, :7], (0, 2, 3, 1)).reshape(len(images), -1)
    return {"pool": pool.numpy(), "logits": logits.numpy(), "spatial": spatial}


@pytest.fixture(scope="module")
def direct(run):
    return {"samples": _direct_features(run["samples"]), "ref": _direct_features(run["ref"])}


def test_features_equal_a_direct_computation(run, direct):
    direct, ref_direct = direct["samples"], direct["ref"]
    for k, dim in (("pool", 2048), ("spatial", 2023), ("logits", 1008)):
        assert run["feats"][k].shape == (N_SAMPLES, dim)
        np.testing.assert_allclose(run["feats"][k], direct[k], rtol=1e-4, atol=1e-5 * np.abs(direct[k]).max())
    np.testing.assert_allclose(run["feats"]["ref_pool"], ref_direct["pool"], rtol=1e-4, atol=1e-6)


def test_numbers_equal_numpy_from_the_same_features(run, direct):
    res, feats = run["result"], run["feats"]
    with np.load(res["reference"]["cache_file"]) as z:
        cache = {k: z[k] for k in z.files}
    ref_direct = direct["ref"]
    # reference statistics (cached next to the reference) = numpy of the reference's features
    np.testing.assert_allclose(cache["pool"], ref_direct["pool"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cache["mu"], cache["pool"].astype(np.float64).mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cache["sigma"], np.cov(cache["pool"], rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cache["mu_s"], ref_direct["spatial"].astype(np.float64).mean(0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(cache["sigma_s"], np.cov(ref_direct["spatial"], rowvar=False),
                               rtol=1e-3, atol=1e-6 * np.abs(cache["sigma_s"]).max())
    # final numbers = numpy (eigen-decomposition FID, ADM's IS and P/R loops) from the same features
    assert res["fid"] == pytest.approx(_np_fid(feats["pool"], cache["pool"]), rel=1e-6)
    s = feats["spatial"].astype(np.float64)
    assert res["sfid"] == pytest.approx(
        _np_fid_stats(s.mean(0), np.cov(s, rowvar=False), cache["mu_s"], cache["sigma_s"]), rel=1e-6)
    assert res["inception_score"] == pytest.approx(_np_inception_score(feats["logits"]), rel=1e-10)
    p, r = _np_precision_recall(feats["ref_pool"], feats["pool"])
    assert (res["precision"], res["recall"]) == (p, r)
    assert res["fid"] > 0 and res["sfid"] > 0


def test_result_json_and_table(run, capsys):
    res = run["result"]
    out = Path(run["cfg"].samples).with_suffix(".eval.json")
    assert json.loads(out.read_text()) == res
    assert res["irepa_eval"] == 1 and res["samples"]["count"] == N_SAMPLES
    assert res["reference"]["images"] == N_REF and res["reference"]["statistics"] == "computed"
    assert res["network"]["weights_sha256"] == "random-seed0"
    assert res["encoder"] == "siglip-vit-b" and res["store"] == "stores/siglip"  # from the run's args.json
    table = ev.format_table(res)
    for word in ("FID", "sFID", "Inception Score", "Precision", "Recall", f"{res['fid']:.4f}"):
        assert word in table


def test_reference_cache_folder_and_adm_statistics(run, tmp_path):
    from PIL import Image

    net = inc.load_inception("random", "cpu")
    root = run["root"]
    # second load: from the cache, same arrays
    first = np.load(run["result"]["reference"]["cache_file"])
    again = ev.load_reference_stats(root / "ref.npz", net, batch_size=3)
    assert again.statistics == "cache" and again.cache_file == run["result"]["reference"]["cache_file"]
    np.testing.assert_array_equal(again.sigma_s, first["sigma_s"])
    np.testing.assert_array_equal(again.pool, first["pool"])
    # the cache file is itself a valid --ref
    as_ref = ev.load_reference_stats(again.cache_file, net)
    np.testing.assert_array_equal(as_ref.mu, first["mu"])
    # a folder of the same images (PNG, crop at their own size) gives the same features
    folder = tmp_path / "refimgs" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(run["ref"]):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    fstats = ev.load_reference_stats(tmp_path / "refimgs", net, batch_size=3, resolution=RES, num_workers=0)
    assert fstats.statistics == "computed" and Path(fstats.cache_file).parent == tmp_path
    np.testing.assert_array_equal(fstats.pool, first["pool"])
    # an ADM reference batch: its mu/sigma/mu_s/sigma_s are used as they are, arr_0 only for P/R
    rng = np.random.default_rng(0)
    adm = {k: first[k] + 1e-3 * rng.random(first[k].shape) for k in ("mu", "mu_s")}
    np.savez(tmp_path / "adm.npz", arr_0=run["ref"], mu=adm["mu"], sigma=first["sigma"], mu_s=adm["mu_s"],
             sigma_s=first["sigma_s"])
    a = ev.load_reference_stats(tmp_path / "adm.npz", net, batch_size=3)
    assert a.statistics == "file"
    np.testing.assert_array_equal(a.mu, adm["mu"])
    np.testing.assert_array_equal(a.mu_s, adm["mu_s"])
    np.testing.assert_array_equal(a.pool, first["pool"])
    # statistics only (no images): FID/sFID yes, precision/recall no
    np.savez(tmp_path / "stats.npz", mu=adm["mu"], sigma=first["sigma"])
    s = ev.load_reference_stats(tmp_path / "stats.npz", net)
    assert s.pool is None and s.mu_s is None and any("no precision/recall" in n for n in s.notes)
    first.close()


def test_fid_of_images_for_training(run, monkeypatch):
    """fid_of_images hands the Frechet distance (tested above) the statistics of the images' pool
    features and the reference's; the distance itself is stubbed to keep the test cheap."""
    net = inc.load_inception("random", "cpu")
    ref = ev.load_reference_stats(run["root"] / "ref.npz", net, need_pr=False)
    assert ref.pool is None and ref.statistics == "cache"
    images = torch.from_numpy(run["samples"]).permute(0, 3, 1, 2)
    seen = []
    monkeypatch.setattr(ev, "frechet_distance", lambda *a: seen.append(a) or 1.5)
    batches = (images[i:i + 3] for i in range(0, N_SAMPLES, 3))  # an iterator of batches
    assert ev.fid_of_images(batches, ref, "cpu", network=net) == 1.5
    assert ev.fid_of_images(images, ref, "cpu", network=net, batch_size=3) == 1.5  # a whole tensor
    pool = run["feats"]["pool"].astype(np.float64)
    for mu, sigma, rmu, rsigma in seen:
        np.testing.assert_allclose(mu, pool.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(sigma, np.cov(pool, rowvar=False), rtol=1e-9, atol=1e-12)
        assert rmu is ref.mu and rsigma is ref.sigma
    with pytest.raises(ValueError, match="has no FID statistics"):
        ev.fid_of_images(images, ev.ReferenceStats("x.npz"), "cpu", network=net)


def test_bad_inputs_fail_with_specific_messages(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, RES, RES, 3), np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, RES, RES), np.uint8))
    np.savez(tmp_path / "other.npz", images=np.zeros((4, RES, RES, 3), np.uint8))
    with pytest.raises(ValueError, match=r"float\.npz.*uint8 \[N, H, W, 3\]"):
        ev.NpzImages(tmp_path / "float.npz")
    with pytest.raises(ValueError, match=r"nchw\.npz.*NHWC.*\[4, 3, 32, 32\]"):
        ev.NpzImages(tmp_path / "nchw.npz")
    with pytest.raises(ValueError, match="no 'arr_0' array of images.*images"):
        ev.NpzImages(tmp_path / "other.npz")
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((4, RES, RES, 3), np.uint8))
    with pytest.raises(ValueError, match="expected ADM reference statistics"):
        ev.load_reference_stats(tmp_path / "other.npz")
    np.savez(tmp_path / "badstats.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match=r"badstats\.npz.*\[2048\]"):
        ev.load_reference_stats(tmp_path / "badstats.npz")
    with pytest.raises(ValueError, match="--metrics"):
        ev.evaluate(ev.EvalConfig(samples=str(tmp_path / "ok.npz"), ref=str(tmp_path / "ok.npz"), metrics="fid,kid"))
    with pytest.raises(ValueError, match="more than 3 images"):
        np.savez(tmp_path / "three.npz", arr_0=np.zeros((3, RES, RES, 3), np.uint8))
        ev.evaluate(ev.EvalConfig(samples=str(tmp_path / "three.npz"), ref=str(tmp_path / "ok.npz")))
    with pytest.raises(SystemExit) as ex:
        ev.main([str(tmp_path / "ok.npz"), "--ref", str(tmp_path / "ok.npz"), "--batch-szie", "3"])
    assert ex.value.code == 2 and "unknown flag --batch-szie" in capsys.readouterr().err


def test_config_values_are_checked_and_provenance_is_read(tmp_path):
    with pytest.raises(ValueError, match="--batch-size takes an integer; got 'abc'"):
        ev.EvalConfig(batch_size="abc")
    with pytest.raises(ValueError, match="--progress takes true/false/yes/no/1/0; got 3"):
        ev.EvalConfig(progress=3)
    assert ev.EvalConfig(metrics=("fid", "is"), encoder=123).metrics == "fid,is"  # a comma list given as a tuple
    # the encoder of a run whose args.json names no encoders: the only one in its store's manifest
    store = tmp_path / "stores" / "dino"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps({"encoders": {"dinov2-vit-b": {}}}))
    (tmp_path / "run" / "samples").mkdir(parents=True)
    (tmp_path / "run" / "args.json").write_text(json.dumps({"cache": str(store), "encoders": None}))
    prov = ev._run_provenance(tmp_path / "run" / "samples" / "samples.npz")
    assert prov == {"run": str(tmp_path / "run"), "store": str(store), "encoder": "dinov2-vit-b"}
    assert ev._run_provenance(tmp_path / "elsewhere" / "s.npz")["encoder"] is None
    assert ev.default_out_path(tmp_path / "run" / "samples" / "samples.npz") == tmp_path / "run" / "samples" / "samples.eval.json"


def test_compressed_npz_streams_the_same_images(tmp_path):
    imgs = _images(7, 3, 0.0)
    np.savez(tmp_path / "a.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "b.npz", arr_0=imgs)
    a, b = ev.NpzImages(tmp_path / "a.npz"), ev.NpzImages(tmp_path / "b.npz")
    assert a._mm is not None and b._mm is None  # memory-mapped vs streamed
    for s, e in ((0, 3), (3, 7), (1, 2), (5, 9)):
        np.testing.assert_array_equal(a.read(s, e), imgs[s:e])
        np.testing.assert_array_equal(b.read(s, e), imgs[s:e])
    assert [x.shape[0] for x in b.iter_batches(2, 7, 2)] == [2, 2, 1]
    b.close()


def test_cli_offline_error_is_one_line(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(5, 0, 0.0))
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), "IREPA_INCEPTION": ""}
    proc = subprocess.run([sys.executable, "-m", "irepa.trainer.evaluate", str(tmp_path / "s.npz"), "--ref",
                           str(tmp_path / "s.npz"), "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and inc.INCEPTION_URL in lines[0] and "--inception-weights" in lines[0]
    assert not (tmp_path / "s.eval.json").exists()


def test_two_processes_equal_one_process(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(N_SAMPLES, 0, 0.0))
    np.savez(tmp_path / "r.npz", arr_0=_images(N_REF, 1, 25.0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for nproc in (2, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "irepa.trainer.evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
               "--device", "cpu", "--inception-weights", "random", "--batch-size", "3", "--metrics", "is,pr",
               "--noref_cache", "--noprogress", "--out", str(tmp_path / f"out{nproc}.json"),
               "--save-features", str(tmp_path / f"f{nproc}.npz")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[nproc] = json.loads((tmp_path / f"out{nproc}.json").read_text())
    assert outs[2]["settings"]["world_size"] == 2 and outs[1]["settings"]["world_size"] == 1
    for k in ("inception_score", "precision", "recall"):
        assert outs[2][k] == outs[1][k]
    with np.load(tmp_path / "f2.npz") as a, np.load(tmp_path / "f1.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["logits", "pool", "ref_pool", "spatial"]
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])  # gathered in order, same batches: bitwise equal
        assert a["pool"].shape == (N_SAMPLES, 2048)


_FAKE_NET = """
import torch


class FakeNet(torch.nn.Module):
    \"\"\"Stands in for the Inception: 6-dim 'pool' features from channel means (cheap, exact).\"\"\"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.extractor = torch.nn.Module()
        self.extractor.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        f = x.double().mean(dim=(2, 3))
        pool = torch.cat([f, f ** 2 / 255.0], 1)
        return {"pool": pool, "spatial": pool, "logits": pool}
"""

_GATHER_SCRIPT = _FAKE_NET + """
import json, sys
import numpy as np
import torch.distributed as dist
from irepa.trainer import evaluate as ev

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
imgs = torch.from_numpy(np.load(sys.argv[1])["arr_0"]).permute(0, 3, 1, 2)
ref = ev.ReferenceStats("stub", mu=np.full(6, 50.0), sigma=np.eye(6) * 30.0) if rank == 0 else None
value = ev.fid_of_images(imgs[rank::world], ref, "cpu", network=FakeNet(), batch_size=2, gather=True)
with open(f"{sys.argv[2]}.{rank}", "w") as f:
    json.dump(value, f)
dist.destroy_process_group()
"""


def test_fid_of_images_gathers_over_ranks(tmp_path):
    """gather=True under 2 gloo ranks (each scoring its share): every rank gets the FID of all images."""
    ns: dict = {}
    exec(_FAKE_NET, ns)
    imgs = _images(11, 4, 0.0)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs)
    (tmp_path / "gather.py").write_text(_GATHER_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "gather.py"), str(tmp_path / "imgs.npz"), str(tmp_path / "fid")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = ev.ReferenceStats("stub", mu=np.full(6, 50.0), sigma=np.eye(6) * 30.0)
    want = ev.fid_of_images(torch.from_numpy(imgs).permute(0, 3, 1, 2), ref, "cpu", network=ns["FakeNet"]())
    got = [json.loads((tmp_path / f"fid.{r}").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- irepa-cache metrics --fid


def _eval_json(path: Path, fid, encoder=None, store=None) -> Path:
    path.write_text(json.dumps({"irepa_eval": 1, "fid": fid, "encoder": encoder, "store": store}))
    return path


def test_metrics_fid_accepts_eval_json(tmp_path):
    a = _eval_json(tmp_path / "a.eval.json", 12.5, encoder="dinov2-vit-b")
    b = _eval_json(tmp_path / "b.eval.json", 20.0, store="stores/siglip")
    c = _eval_json(tmp_path / "c.eval.json", 30.0)
    assert mr.read_fid_inputs(str(a)) == {"dinov2-vit-b": 12.5}
    assert mr.read_fid_inputs(f"{a},{b}") == {"dinov2-vit-b": 12.5, "siglip": 20.0}
    assert mr.read_fid_inputs(f"mae={c},clip={a}") == {"mae": 30.0, "clip": 12.5}
    assert mr.read_fid_inputs([str(a), f"mae={c}"]) == {"dinov2-vit-b": 12.5, "mae": 30.0}
    with pytest.raises(ValueError, match="names no encoder.*ENCODER="):
        mr.read_fid_inputs(str(c))
    with pytest.raises(ValueError, match="two FID entries for 'dinov2-vit-b'"):
        mr.read_fid_inputs(f"{a},{a}")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        mr.read_fid_inputs(f"{a},x=missing.json")
    no_fid = _eval_json(tmp_path / "d.eval.json", None, encoder="x")
    with pytest.raises(ValueError, match="has no FID"):
        mr.read_fid_inputs(str(no_fid))
    (tmp_path / "t.csv").write_text("name,fid\ndinov2,22.75\n")
    assert mr.read_fid_inputs(str(tmp_path / "t.csv")) == {"dinov2": 22.75}  # tables still work
    with pytest.raises(ValueError, match="not an irepa-eval result"):
        mr.read_fid_inputs(f"{a},{tmp_path / 't.csv'}")


def test_metrics_fid_reads_the_json_irepa_eval_writes(run):
    path = Path(run["result"]["file"])
    assert mr.read_fid_inputs(str(path)) == {"siglip-vit-b": run["result"]["fid"]}


# ----------------------------------------------------------------------------- real weights (optional)


@pytest.mark.skipif(not os.environ.get("IREPA_INCEPTION"), reason="IREPA_INCEPTION (Inception weights file) not set")
def test_pool_features_match_torch_fidelity_with_real_weights():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = os.environ["IREPA_INCEPTION"]
    ours = inc.load_inception(path, "cpu")
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=path)
    x = torch.from_numpy(_images(4, 11, 0.0)).permute(0, 3, 1, 2).contiguous()
    mine = ours(x)
    pool, logits = theirs(x)
    np.testing.assert_allclose(mine["pool"].numpy(), pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine["logits"].numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)
    assert ours.weights_sha256.startswith(inc.INCEPTION_SHA256_PREFIX)

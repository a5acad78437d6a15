"""Spatial-structure metrics (pipeline.spatial_metrics) and the metrics report (pipeline.metrics_report).

The fast, batched metrics are checked against a slow direct implementation that loops over token
pairs in plain Python (float64), and against closed forms: a constant grid, a smooth ramp whose
4-neighbour cosine is known exactly, and i.i.d. Gaussian tokens with large D (LDS ~ 0, CDS ~ 0,
RMSC ~ sqrt(1 - 1/T)). Grids of 6x6 and up contain every distance 1..8 and pairs at d >= 6; the
small-grid behaviour (distances missing) is tested separately.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from irepa.pipeline import metrics_report as mr
from irepa.pipeline.spatial_metrics import (
    correlogram,
    infer_grid,
    manhattan_distance,
    spatial_metrics,
    spatial_normalize,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- slow reference


def slow_metrics(x: np.ndarray, h: int, w: int, mask=None, near=1, far=6, max_dist=8) -> dict:
    """Direct definitions, one image: loops over token pairs. x: [T, D] float64."""
    T = h * w
    unit = []
    for t in range(T):
        n = math.sqrt(sum(float(v) * float(v) for v in x[t]))
        unit.append([float(v) / n for v in x[t]] if n > 0 else [0.0] * x.shape[1])

    def cos(a, b):
        return sum(p * q for p, q in zip(unit[a], unit[b]))

    def pos(t):
        return divmod(t, w)

    # LDS: explicit 4-neighbour offsets (not via the distance) vs pairs at d >= far.
    local = []
    for t in range(T):
        i, j = pos(t)
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= i + di < h and 0 <= j + dj < w:
                local.append(cos(t, (i + di) * w + (j + dj)))
    by_d = defaultdict(list)
    for t in range(T):
        for s in range(T):
            if s != t:
                (i, j), (k, l) = pos(t), pos(s)
                by_d[abs(i - k) + abs(j - l)].append(cos(t, s))
    far_vals = [c for d, cs in by_d.items() if d >= far for c in cs]
    assert near == 1
    lds = (sum(local) / len(local) - sum(far_vals) / len(far_vals)) if far_vals else float("nan")

    ds = [d for d in range(1, max_dist + 1) if by_d[d]]
    g = [sum(by_d[d]) / len(by_d[d]) for d in ds]
    cds = -float(np.polyfit(ds, g, 1)[0]) if len(ds) >= 2 else float("nan")

    mean = [sum(unit[t][c] for t in range(T)) / T for c in range(x.shape[1])]
    rmsc = math.sqrt(sum(sum((unit[t][c] - mean[c]) ** 2 for c in range(x.shape[1])) for t in range(T)) / T)
    out = {"lds": lds, "cds": cds, "rmsc": rmsc}

    if mask is not None:
        deltas = []
        for t in range(T):
            if not mask[t]:
                continue
            p, n = [], []
            for s in range(T):
                (i, j), (k, l) = pos(t), pos(s)
                d = abs(i - k) + abs(j - l)
                if mask[s] and 1 <= d <= near:
                    p.append(cos(t, s))
                if not mask[s] and d >= far:
                    n.append(cos(t, s))
            if p and n:
                deltas.append(sum(p) / len(p) - sum(n) / len(n))
        out["srss"] = sum(deltas) / len(deltas) if deltas else float("nan")
    return out


def slow_spatial_norm(x: np.ndarray, gamma: float) -> np.ndarray:
    y = x - gamma * x.mean(axis=0, keepdims=True)
    return y / (y.std(axis=0, ddof=1, keepdims=True) + 1e-6)


def assert_close(a, b, tol):
    a, b = float(a), float(b)
    if math.isnan(b):
        assert math.isnan(a), (a, b)
    else:
        assert abs(a - b) <= tol, (a, b)


# ----------------------------------------------------------------------------- the library


@pytest.mark.parametrize("h,w", [(6, 6), (10, 10), (5, 8)])
@pytest.mark.parametrize("snorm", [False, True])
def test_matches_slow_reference(h, w, snorm):
    gen = torch.Generator().manual_seed(h * 100 + w + snorm)
    # Smooth field plus noise, so the metrics are well away from 0.
    base = torch.randn(3, 8, h, w, generator=gen, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(base, 3, stride=1, padding=1, count_include_pad=False)
    x = (smooth + 0.3 * torch.randn(3, 8, h, w, generator=gen, dtype=torch.float64)).flatten(2).transpose(1, 2)
    x = x + 0.5  # a global component, so the spatial norm has something to remove
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 1:4, 1:4] = True  # a square object
    masks[1] = torch.rand(h, w, generator=gen) > 0.5
    masks[2, :, : w // 2] = True  # left half
    grid = None if h == w else (h, w)
    got = spatial_metrics(x, grid, spatial_norm=snorm, gamma=0.8, masks=masks)
    assert set(got) == {"lds", "cds", "rmsc", "srss"}
    for b in range(3):
        xb = x[b].numpy()
        if snorm:
            xb = slow_spatial_norm(xb, 0.8)
        want = slow_metrics(xb, h, w, mask=masks[b].reshape(-1).tolist())
        for k in want:
            assert got[k].shape == (3,)
            assert_close(got[k][b], want[k], 1e-9)
    assert abs(float(got["lds"][0])) > 1e-3 and abs(float(got["cds"][0])) > 1e-4


def test_chunking_and_device_arg_do_not_change_results():
    x = torch.randn(7, 64, 5)
    masks = torch.rand(7, 64) > 0.4
    full = spatial_metrics(x, masks=masks)
    tiny = spatial_metrics(x, masks=masks, chunk_bytes=1, device="cpu")  # one image per chunk
    for k in full:
        torch.testing.assert_close(full[k], tiny[k], equal_nan=True)


def test_correlogram_matches_slow_means():
    x = torch.randn(2, 49, 6, dtype=torch.float64)
    g = correlogram(x, max_dist=14)
    u = torch.nn.functional.normalize(x, dim=-1)
    dist = manhattan_distance(7, 7)
    for b in range(2):
        gram = u[b] @ u[b].T
        for d in range(0, 15):
            sel = gram[dist == d]
            if sel.numel():
                assert_close(g[b, d], sel.mean(), 1e-12)
            else:
                assert math.isnan(float(g[b, d]))  # 7x7 has no d > 12
    assert torch.allclose(g[:, 0], torch.ones(2, dtype=torch.float64))


def test_constant_grid():
    v = torch.tensor([0.3, -1.2, 2.0, 0.7])
    x = v.expand(2, 100, 4).clone()
    got = spatial_metrics(x)
    for k in ("lds", "cds", "rmsc"):
        assert torch.allclose(got[k], torch.zeros(2), atol=1e-6), (k, got[k])
    # After the spatial norm a constant grid is all zeros: every cosine 0, still no structure.
    sn = spatial_metrics(x, spatial_norm=True)
    for k in ("lds", "cds", "rmsc"):
        assert torch.allclose(sn[k], torch.zeros(2), atol=1e-6)


def ramp_tokens(h: int, w: int, alpha: float) -> torch.Tensor:
    """K(t, t') = (cos(alpha*di) + cos(alpha*dj)) / 2: similarity decays smoothly with distance."""
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    feats = torch.stack([torch.cos(alpha * i), torch.sin(alpha * i), torch.cos(alpha * j),
                         torch.sin(alpha * j)], dim=-1) / math.sqrt(2)
    return feats.reshape(1, h * w, 4)


def test_smooth_ramp_grid():
    h = w = 12
    alpha = math.pi / (2 * (h - 1))
    x = ramp_tokens(h, w, alpha)
    g = correlogram(x, max_dist=8)[0]
    assert torch.all(g[1:] < g[:-1]), g  # strictly decreasing with distance
    got = spatial_metrics(x)
    assert float(got["cds"][0]) > 0 and float(got["lds"][0]) > 0
    # Closed form of the local term: every 4-neighbour pair has K = (1 + cos(alpha)) / 2.
    dist = manhattan_distance(h, w)
    ii = torch.arange(h * w) // w
    jj = torch.arange(h * w) % w
    kern = 0.5 * (torch.cos(alpha * (ii[:, None] - ii[None, :]).double())
                  + torch.cos(alpha * (jj[:, None] - jj[None, :]).double()))
    far_mean = kern[dist >= 6].mean()
    want_lds = (1 + math.cos(alpha)) / 2 - float(far_mean)
    assert_close(got["lds"][0], want_lds, 1e-12)
    # CDS closed form: least-squares slope of the exact correlogram.
    gd = [float(kern[dist == d].mean()) for d in range(1, 9)]
    assert_close(got["cds"][0], -np.polyfit(range(1, 9), gd, 1)[0], 1e-12)


def test_iid_gaussian_large_dim():
    gen = torch.Generator().manual_seed(0)
    h = w = 12
    T = h * w
    x = torch.randn(4, T, 2048, generator=gen)
    got = spatial_metrics(x)
    assert torch.all(got["lds"].abs() < 0.01), got["lds"]
    assert torch.all(got["cds"].abs() < 0.005), got["cds"]
    # E||mean of T unit vectors||^2 = 1/T for independent directions -> RMSC = sqrt(1 - 1/T).
    assert torch.allclose(got["rmsc"], torch.full((4,), math.sqrt(1 - 1 / T)), atol=1e-3), got["rmsc"]


def test_spatial_norm_variant():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 16, generator=gen, dtype=torch.float64)
    # spatial_normalize is the iREPA formula (Bessel-corrected std over tokens, +1e-6).
    for gamma in (1.0, 0.6, 0.0):
        want = np.stack([slow_spatial_norm(x[b].numpy(), gamma) for b in range(2)])
        np.testing.assert_allclose(spatial_normalize(x, gamma).numpy(), want, rtol=1e-12, atol=1e-12)
    # spatial_norm=True is the metrics of the normalised tokens.
    a = spatial_metrics(x, spatial_norm=True, gamma=0.6)
    b = spatial_metrics(spatial_normalize(x, 0.6))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # A large shared (global) component hides the spatial contrast in the raw tokens; with
    # gamma = 1 the normalisation removes it exactly, so the result is offset-invariant.
    offset = 20.0 * torch.randn(1, 1, 16, generator=gen, dtype=torch.float64)
    raw, raw_off = spatial_metrics(x), spatial_metrics(x + offset)
    sn, sn_off = spatial_metrics(x, spatial_norm=True), spatial_metrics(x + offset, spatial_norm=True)
    for k in sn:
        torch.testing.assert_close(sn[k], sn_off[k], rtol=1e-6, atol=1e-9)
    assert torch.all(raw_off["rmsc"] < 0.2) and torch.all(raw["rmsc"] > 0.9)
    assert torch.all(sn_off["rmsc"] > 0.9)
    # gamma = 0 keeps the offset (only divides by the std), so it differs from gamma = 1.
    g0 = spatial_metrics(x + offset, spatial_norm=True, gamma=0.0)
    assert torch.all(g0["rmsc"] < 0.5)


def test_small_grids_and_grid_errors():
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    got = spatial_metrics(x)  # 3x3: max distance 4, no pair at d >= 6
    assert torch.isnan(got["lds"]).all()
    for b in range(2):
        want = slow_metrics(x[b].numpy(), 3, 3)
        assert_close(got["cds"][b], want["cds"], 1e-9)  # fitted on d = 1..4
        assert_close(got["rmsc"][b], want["rmsc"], 1e-9)
    one_row = spatial_metrics(torch.randn(1, 2, 3), grid=(1, 2))  # only d = 1: no slope
    assert torch.isnan(one_row["cds"]).all()
    assert infer_grid(256) == (16, 16) and infer_grid(12, (3, 4)) == (3, 4)
    with pytest.raises(ValueError, match="10 tokens is not a square"):
        spatial_metrics(torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match="grid 4x4 does not match 12 tokens"):
        spatial_metrics(torch.randn(1, 12, 4), grid=(4, 4))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        spatial_metrics(torch.randn(12, 4))
    with pytest.raises(ValueError, match="masks must be"):
        spatial_metrics(torch.randn(2, 16, 4), masks=torch.ones(2, 15, dtype=torch.bool))


def test_srss_edge_cases():
    x = torch.randn(3, 100, 8, dtype=torch.float64)
    m = torch.zeros(3, 10, 10, dtype=torch.bool)
    m[0] = True  # no background: no negatives
    m[2, :5] = True
    got = spatial_metrics(x, masks=m)
    assert math.isnan(float(got["srss"][0])) and math.isnan(float(got["srss"][1]))  # full / empty
    flat = spatial_metrics(x, masks=m.reshape(3, 100).float())
    torch.testing.assert_close(got["srss"], flat["srss"], equal_nan=True)
    assert_close(got["srss"][2], slow_metrics(x[2].numpy(), 10, 10, mask=m[2].reshape(-1).tolist())["srss"], 1e-9)


# ----------------------------------------------------------------------------- report helpers


def test_summarize_confidence_interval():
    vals = [0.1, 0.4, float("nan"), 0.35, 0.2, 0.6]
    s = mr.summarize(vals)
    arr = np.array([0.1, 0.4, 0.35, 0.2, 0.6])
    sd = math.sqrt(((arr - arr.mean()) ** 2).sum() / 4)
    assert s["n"] == 5
    assert_close(s["mean"], arr.mean(), 1e-15)
    assert_close(s["sd"], sd, 1e-15)
    assert_close(s["half_width"], 1.96 * sd / math.sqrt(5), 1e-15)
    assert_close(s["ci_low"], arr.mean() - 1.96 * sd / math.sqrt(5), 1e-15)
    assert mr.summarize([0.5])["half_width"] is None and mr.summarize([0.5])["mean"] == 0.5
    assert mr.summarize([float("nan")])["mean"] is None


def test_sample_indices():
    a = mr.sample_indices(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, mr.sample_indices(1000, 50, seed=3))
    assert not np.array_equal(a, mr.sample_indices(1000, 50, seed=4))
    assert np.array_equal(mr.sample_indices(10, 4096), np.arange(10))
    assert np.array_equal(mr.sample_indices(10, 0), np.arange(10))


def test_read_fid_table(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"dinov2": 22.75, "clip": 24.84}))
    assert mr.read_fid_table(tmp_path / "f.json") == {"dinov2": 22.75, "clip": 24.84}
    (tmp_path / "f.csv").write_text("encoder,fid\n# comment\ndinov2,22.75\n\nclip, 24.84\n")
    assert mr.read_fid_table(tmp_path / "f.csv") == {"dinov2": 22.75, "clip": 24.84}
    (tmp_path / "f.tsv").write_text("dinov2\t22.75\nclip\t24.84\n")
    assert mr.read_fid_table(tmp_path / "f.tsv") == {"dinov2": 22.75, "clip": 24.84}
    (tmp_path / "bad.csv").write_text("name,fid\ndinov2,22.75\nclip,abc\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: FID 'abc' is not a number"):
        mr.read_fid_table(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text(json.dumps({"dinov2": "x"}))
    with pytest.raises(ValueError, match="FID of 'dinov2' is not a number"):
        mr.read_fid_table(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        mr.read_fid_table(tmp_path / "missing.json")


def _fake_row(name, lds, cds, rmsc):
    metrics = {v: {"lds": mr.summarize([lds]), "cds": mr.summarize([cds]), "rmsc": mr.summarize([rmsc])}
               for v in mr.VARIANTS}
    return {"name": name, "encoder": name, "store": f"stores/{name}", "store_label": name,
            "store_encoders": 1, "metrics": metrics}


def test_fid_correlations_match_scipy():
    from scipy import stats

    rows = [_fake_row("a", 0.30, 0.02, 0.5), _fake_row("b", 0.10, 0.01, 0.7),
            _fake_row("c", 0.25, 0.03, 0.4), _fake_row("d", 0.05, 0.00, 0.9), _fake_row("e", 0.2, 0.01, 0.1)]
    fid = {"a": 20.0, "b": 25.0, "c": 21.5, "d": 27.0, "zzz": 1.0}
    res = mr.fid_correlations(rows, fid)
    assert res["rows_without_fid"] == ["e"] and res["unused_fid_entries"] == ["zzz"]
    xs = [0.30, 0.10, 0.25, 0.05]
    ys = [20.0, 25.0, 21.5, 27.0]
    c = res["correlation"]["raw"]["lds"]
    assert c["n"] == 4
    assert_close(c["pearson_r"], stats.pearsonr(xs, ys)[0], 1e-12)
    assert_close(c["pearson_p"], stats.pearsonr(xs, ys)[1], 1e-12)
    assert_close(c["spearman_r"], stats.spearmanr(xs, ys)[0], 1e-12)
    assert c["pearson_r"] < -0.9  # more spatial structure, lower FID in this toy table
    few = mr.fid_correlations(rows[:2], fid)["correlation"]["raw"]["lds"]
    assert few["pearson_r"] is None and "needs >= 3" in few["note"]


def test_fid_correlation_counts_each_encoder_once():
    """One encoder cached in two stores is one FID point (its metric averaged), not two."""
    def row(store, enc, lds):
        r = _fake_row(enc, lds, 0.0, 0.0)
        r.update(name=f"{store}/{enc}", store=f"stores/{store}", store_label=store, store_encoders=2)
        return r

    rows = [row("s1", "a", 0.30), row("s1", "b", 0.10), row("s2", "a", 0.20), row("s2", "b", 0.12)]
    res = mr.fid_correlations(rows, {"a": 20.0, "b": 25.0})
    c = res["correlation"]["raw"]["lds"]
    assert c["n"] == 2 and c["pearson_r"] is None  # two encoders: too few points, whatever the rows
    assert res["points"] == {"a": ["s1/a", "s2/a"], "b": ["s1/b", "s2/b"]}
    rows.append(row("s1", "c", 0.05))
    res = mr.fid_correlations(rows, {"a": 20.0, "b": 25.0, "c": 27.0})
    from scipy import stats

    xs, ys = [0.25, 0.11, 0.05], [20.0, 25.0, 27.0]
    assert_close(res["correlation"]["raw"]["lds"]["pearson_r"], stats.pearsonr(xs, ys)[0], 1e-12)


# ----------------------------------------------------------------------------- run_metrics on stores

ENCODERS = {"enc_a": 8, "enc_b": 12, "enc_c": 6}


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    from irepa.stores.testing import make_synthetic_store

    root = tmp_path_factory.mktemp("stores")
    return make_synthetic_store(root / "multi", num_samples=20, encoders=ENCODERS, grid=(6, 6),
                                format="zarr", shard_size=8, skipped_rows=[3])


def _expected_per_image(store, indices, enc, **kw):
    from irepa.stores import open_store

    reader = open_store(store)
    feats = torch.from_numpy(reader.get_batch(indices, with_latents=False)["features"][enc])
    return spatial_metrics(feats, (6, 6), **kw)


def test_run_metrics_on_synthetic_store(zarr_store, tmp_path, capsys):
    from scipy import stats

    fid = tmp_path / "fid.csv"
    fid.write_text("name,fid\nenc_a,22.5\nenc_b,24.0\nenc_c,21.0\nother,30\n")
    out = tmp_path / "out"
    rep = mr.run_metrics([str(zarr_store)], limit=12, out=str(out), fid=str(fid), seed=5, device="cpu",
                         gamma=0.8, batch_size=5, progress=False)
    printed = capsys.readouterr().out

    data = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in data["rows"]] == list(ENCODERS)
    idx = mr.sample_indices(19, 12, seed=5)  # 20 rows, one skipped
    for row in data["rows"]:
        assert row["store"] == str(zarr_store) and row["grid"] == [6, 6] and row["num_images"] == 12
        assert row["dim"] == ENCODERS[row["encoder"]]
        assert row["per_image"]["index"] == idx.tolist()
        assert row["per_image"]["key"][0].endswith(".png")
        for variant, kw in (("raw", {}), ("snorm", {"spatial_norm": True, "gamma": 0.8})):
            want = _expected_per_image(zarr_store, idx, row["encoder"], **kw)
            assert set(row["metrics"][variant]) == {"lds", "cds", "rmsc"}
            for m in ("lds", "cds", "rmsc"):
                np.testing.assert_allclose(row["per_image"][variant][m], want[m].double().numpy(), rtol=1e-6, atol=1e-7)
                s = row["metrics"][variant][m]
                vals = np.array(row["per_image"][variant][m])
                assert s["n"] == 12
                assert_close(s["mean"], vals.mean(), 1e-12)
                assert_close(s["half_width"], 1.96 * vals.std(ddof=1) / math.sqrt(12), 1e-12)

    # FID correlation: scipy on the same numbers (row means from the JSON, FID from the table).
    f = data["fid"]
    assert f["values"] == {"enc_a": 22.5, "enc_b": 24.0, "enc_c": 21.0}
    assert f["unused_fid_entries"] == ["other"]
    for variant in ("raw", "snorm"):
        for m in ("lds", "cds", "rmsc"):
            xs = [r["metrics"][variant][m]["mean"] for r in data["rows"]]
            c = f["correlation"][variant][m]
            assert c["n"] == 3
            assert_close(c["pearson_r"], stats.pearsonr(xs, [22.5, 24.0, 21.0])[0], 1e-9)
            assert_close(c["spearman_r"], stats.spearmanr(xs, [22.5, 24.0, 21.0])[0], 1e-9)

    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (out / "metrics.txt").read_text()
    assert table.strip() in printed
    lines = table.splitlines()
    for name in ENCODERS:
        assert sum(1 for ln in lines if ln.startswith(name + " ")) == 1
    a = data["rows"][0]["metrics"]["raw"]["lds"]
    assert f"{a['mean']:.4f}±{a['half_width']:.4f}" in table
    assert "Correlation with FID" in table
    assert rep["files"]["png"] == str(out / "metrics.png")
    # the figure states the real sample count and names its markers (issue 15)
    from irepa.pipeline.metrics_report import report_figure

    fig = report_figure(data)
    assert fig._suptitle.get_text().endswith("(12 images per store)")
    scatter_axes = [ax for ax in fig.axes if ax.get_ylabel() == "FID"]
    legends = [ax.get_legend() for ax in scatter_axes if ax.get_legend() is not None]
    assert legends and [t.get_text() for t in legends[0].get_texts()] == ["raw", "spatial-norm"]


def test_run_metrics_two_stores_and_wds(zarr_store, tmp_path):
    """Same encoder name in two stores -> rows "store/encoder"; the wds backend reads the same samples."""
    from irepa.stores.testing import make_synthetic_store

    wds = make_synthetic_store(tmp_path / "multi_wds", num_samples=20, encoders=ENCODERS, grid=(6, 6),
                               format="wds", shard_size=8, skipped_rows=[3])
    rep = mr.run_metrics([str(zarr_store), str(wds)], limit=7, out=str(tmp_path / "o"), seed=1,
                         device="cpu", progress=False, echo=False)
    names = [r["name"] for r in rep["rows"]]
    assert names == [f"multi/{e}" for e in ENCODERS] + [f"multi_wds/{e}" for e in ENCODERS]
    for z, w in zip(rep["rows"][:3], rep["rows"][3:]):
        assert z["per_image"]["index"] == w["per_image"]["index"] == mr.sample_indices(19, 7, 1).tolist()
        assert z["per_image"]["key"] == w["per_image"]["key"]
        np.testing.assert_allclose(z["per_image"]["raw"]["lds"], w["per_image"]["raw"]["lds"], rtol=1e-6)


def test_store_without_features_is_refused(tmp_path):
    from irepa.stores import StoreError
    from irepa.stores.testing import make_synthetic_store

    lat = make_synthetic_store(tmp_path / "latents_only", encoders={})
    good = make_synthetic_store(tmp_path / "good", encoders={"a": 4})
    with pytest.raises(StoreError, match=f"store {lat} holds no encoder features"):
        mr.run_metrics([str(good), str(lat)], out=str(tmp_path / "o"), device="cpu", progress=False, echo=False)
    assert not (tmp_path / "o").exists()


def test_masks_folder_and_array(zarr_store, tmp_path):
    from PIL import Image
    from irepa.stores import open_store

    reader = open_store(zarr_store)
    n = len(reader)
    keys = reader.keys()
    gen = np.random.default_rng(0)
    grid_masks = gen.random((n, 6, 6)) > 0.5
    grid_masks[:, 0, 0], grid_masks[:, 5, 5] = True, False  # never all-fg / all-bg
    full = np.kron(grid_masks, np.ones((4, 4), dtype=bool))  # 24x24 "image-resolution" masks
    # Folder of PNGs keyed by sample key, for the even sample indices only.
    folder = tmp_path / "masks"
    for i in range(0, n, 2):
        p = folder / f"{keys[i].rsplit('.', 1)[0]}.png"  # "<key without extension>.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(full[i].astype(np.uint8) * 255).save(p)
    rep = mr.run_metrics([str(zarr_store)], limit=0, out=str(tmp_path / "o1"), masks=str(folder),
                         device="cpu", progress=False, echo=False)
    feats = torch.from_numpy(reader.get_batch(np.arange(n), with_latents=False)["features"]["enc_b"])
    want = spatial_metrics(feats, masks=torch.from_numpy(grid_masks))["srss"].double().numpy()
    row = rep["rows"][1]
    got = np.array([np.nan if v is None else v for v in row["per_image"]["raw"]["srss"]])
    np.testing.assert_allclose(got[0::2], want[0::2], rtol=1e-6)
    assert np.isnan(got[1::2]).all()  # no mask file -> no SRSS for that image
    assert row["metrics"]["raw"]["srss"]["n"] == len(range(0, n, 2))
    assert "SRSS raw" in (tmp_path / "o1" / "metrics.txt").read_text()

    # A .npy aligned on the sample index gives every image its SRSS.
    np.save(tmp_path / "m.npy", full)
    rep2 = mr.run_metrics([str(zarr_store)], limit=0, out=str(tmp_path / "o2"), masks=str(tmp_path / "m.npy"),
                          device="cpu", progress=False, echo=False)
    np.testing.assert_allclose(rep2["rows"][1]["per_image"]["raw"]["srss"], want, rtol=1e-6)

    np.save(tmp_path / "short.npy", full[:5])
    with pytest.raises(ValueError, match=r"5 masks, but store .* has 19 samples"):
        mr.run_metrics([str(zarr_store)], out=str(tmp_path / "o3"), masks=str(tmp_path / "short.npy"),
                       device="cpu", progress=False, echo=False)
    with pytest.raises(ValueError, match="no mask found for any"):
        mr.run_metrics([str(zarr_store)], out=str(tmp_path / "o4"), masks=str(tmp_path / "o1"),
                       device="cpu", progress=False, echo=False)

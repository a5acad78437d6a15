"""The build records each encoder's preprocessing profile and precision (issue 14, items 1 and 3)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from irepa.pipeline.build import _already_complete, build_store, encoder_autocast, effective_precision
from irepa.pipeline.encoders import load_encoder
from irepa.pipeline.sources import default_sample_source
from irepa.stores import describe_store, format_description, open_store

TINY = dict(vae="tiny", encoder_config="tiny", num_workers=0, progress=False, device="cpu", shard_size=5,
            batch_size=5)


def test_encoder_autocast_precisions():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that autocast is disabled
        assert encoder_autocast(torch.device("cuda"), "fp16").fast_dtype == torch.float16
        assert encoder_autocast(torch.device("cuda"), "bf16").fast_dtype == torch.bfloat16
    assert not hasattr(encoder_autocast(torch.device("cuda"), "fp32"), "fast_dtype")
    assert not hasattr(encoder_autocast(torch.device("cpu"), "fp16"), "fast_dtype")
    assert effective_precision(torch.device("cuda"), "fp16") == "fp16"
    assert effective_precision(torch.device("cpu"), "fp16") == "fp32"
    with pytest.raises(ValueError, match="--precision must be one of bf16, fp16, fp32, not 'fp8'"):
        encoder_autocast(torch.device("cuda"), "fp8")


def test_build_records_profile_and_precision_and_inspect_shows_them(tmp_path):
    out = tmp_path / "s"
    build_store(out=str(out), encoder="siglip-vit-b,pe-vit-b", precision="fp16", **TINY)
    m = json.loads((out / "manifest.json").read_text())
    for name in ("siglip-vit-b", "pe-vit-b"):
        e = m["encoders"][name]
        enc = load_encoder(name, 256, pretrained=False, config="tiny")
        assert e["preprocess"] == enc.profile.to_dict() and e["preprocess"]["profile"] == "irepa"
        assert e["precision"] == "fp32"  # CPU: autocast only runs on CUDA
    assert m["encoders"]["siglip-vit-b"]["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert m["encoders"]["pe-vit-b"]["preprocess"]["interpolation"] == "bilinear"
    assert m["build_args"]["precision"] == "fp32" and m["build_args"]["preprocess"] == "irepa"
    # the cached tokens are the irepa encoder's
    store = open_store(out)
    src = default_sample_source()
    from irepa.pipeline.transforms import DecodeDataset

    img = DecodeDataset(src, 256)[0]["image"][None]
    p, c = load_encoder("pe-vit-b", 256, pretrained=False, config="tiny")(img)
    got = store.get_batch([0])
    np.testing.assert_allclose(got["features"]["pe-vit-b"][0], p[0].numpy(), rtol=2e-3, atol=2e-3 * p.abs().max().item())
    text = format_description(describe_store(out))
    assert "preprocess irepa: mean=[0.485, 0.456, 0.406]" in text and "interpolation=bilinear" in text
    # a rerun is "already complete" only with the very same resolved options (the profile included)
    assert not _already_complete(str(out), m["dataset"]["fingerprint"], {**m["build_args"], "preprocess": "native"})
    assert _already_complete(str(out), m["dataset"]["fingerprint"], dict(m["build_args"]))


def test_native_build_and_stores_from_before_profiles(tmp_path):
    out = tmp_path / "n"
    build_store(out=str(out), encoder="siglip-vit-b", preprocess="native", **TINY)
    m = json.loads((out / "manifest.json").read_text())
    assert m["encoders"]["siglip-vit-b"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert m["encoders"]["siglip-vit-b"]["preprocess"]["profile"] == "native"
    # a store written before profiles existed: no 'preprocess' key -> read and reported as native
    del m["encoders"]["siglip-vit-b"]["preprocess"], m["encoders"]["siglip-vit-b"]["precision"]
    (out / "manifest.json").write_text(json.dumps(m))
    assert open_store(out).encoders == ["siglip-vit-b"]
    d = describe_store(out)
    assert d["encoders"]["siglip-vit-b"]["preprocess"] == {"profile": "native"}
    assert "preprocess native: (store built before profiles)" in format_description(d)
    assert _already_complete(str(out), m["dataset"]["fingerprint"], dict(m["build_args"]))
    with pytest.raises(ValueError, match=r"--preprocess must be one of irepa, native; got 'repa' \(did you mean irepa\?\)"):
        build_store(out=str(tmp_path / "x"), encoder="siglip-vit-b", preprocess="repa", **TINY)
    with pytest.raises(ValueError, match="--precision must be one of bf16, fp16, fp32; got 'half'"):
        build_store(out=str(tmp_path / "x"), encoder="siglip-vit-b", precision="half", **TINY)

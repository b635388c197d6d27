"""Provenance: versions, device, dtype, and weight hashes that are computed once per file version."""

import hashlib
import json
import os

import torch

from fixative.core import provenance as provenance_module
from fixative.core.provenance import provenance, sha256


def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FIXATIVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(provenance_module, "_memory", {})


def test_hashes_are_cached_by_path_size_and_modification_time(monkeypatch, tmp_path):
    fresh_cache(monkeypatch, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = sha256(weights)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    stamp = weights.stat().st_mtime_ns
    weights.write_bytes(b"b" * 1000)  # same size; put the old modification time back: the cache answers
    os.utime(weights, ns=(stamp, stamp))
    assert sha256(weights) == first
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))  # a new modification time: hashed again
    assert sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest()
    cached = json.loads((tmp_path / "home" / "sha256.json").read_text())
    assert cached[str(weights.resolve())]["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest()  # kept across runs


def test_provenance_names_versions_device_dtype_and_each_models_weights(monkeypatch, tmp_path, sd_folder):
    fresh_cache(monkeypatch, tmp_path)
    folder = sd_folder("tiny-sd1")
    record = provenance({"model": folder}, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["fixative"]
    assert {"diffusers", "transformers", "python"} <= set(record["versions"])
    assert (record["device"], record["dtype"]) == ("cpu", "bfloat16")
    hashes = record["models"]["model"]["sha256"]
    assert set(hashes) == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    assert (
        hashes["text_encoder/model.safetensors"]
        == hashlib.sha256((folder / "text_encoder" / "model.safetensors").read_bytes()).hexdigest()
    )
    json.dumps(record)  # stored whole in PNG metadata and JSON results

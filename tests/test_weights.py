"""One set of quickstart weights everywhere (clbench.weights): the shipped file is checked against its pinned
sha256 before use and never replaced silently, and the suite hash covers the checksum of the weights a run loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import clbench.weights as weights
from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.model.backbones import build_model
from clbench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "suites" / "quickstart.yaml"
FNAME = weights.SHIPPED[("vit_tiny_clbench", 16, 1)]


def test_the_shipped_file_is_the_pinned_one_and_the_quickstart_backbone_loads_it():
    pinned = weights.pinned_sums()[FNAME]
    path = weights.shipped_weights("vit_tiny_clbench", 16, 1)
    assert weights.file_sha256(path) == pinned and path.stat().st_size < 1 << 20  # small enough to ship
    from safetensors.torch import load_file

    state = load_file(str(path))
    model = build_model("vit_tiny_clbench", 16, pretrained=True, checkpoint=None)
    loaded = model.backbone.state_dict()
    assert state and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_shipped_file_with_other_bytes_is_refused_in_one_line(tmp_path, monkeypatch):
    for name in (FNAME, "SHA256SUMS"):
        shutil.copy(weights.weights_dir() / name, tmp_path / name)
    blob = bytearray((tmp_path / FNAME).read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    (tmp_path / FNAME).write_bytes(bytes(blob))
    monkeypatch.setattr(weights, "weights_dir", lambda: tmp_path)
    weights.pinned_sums.cache_clear()
    try:
        with pytest.raises(ClbenchError) as err:
            build_model("vit_tiny_clbench", 16, pretrained=True, checkpoint=None)
    finally:
        weights.pinned_sums.cache_clear()
    msg = str(err.value)
    assert str(tmp_path / FNAME) in msg and "is not the pinned" in msg and weights.REGENERATE in msg
    assert "\n" not in msg


def test_pretrained_tiny_weights_clbench_does_not_ship_name_the_way_to_make_them():
    with pytest.raises(ClbenchError) as err:
        build_model("vit_micro_clbench", 16, pretrained=True, checkpoint=None)
    msg = str(err.value)
    assert msg.startswith("backbone.pretrained:") and "python -m clbench.model.pretrain --name vit_micro_clbench" in msg
    assert "backbone.checkpoint" in msg and "\n" not in msg
    # and `clbench run` says so before any run exists (preflight)
    from clbench.run.preflight import backbone_problem
    from clbench.suite import BackboneConfig

    assert backbone_problem(BackboneConfig(name="vit_micro_clbench", image_size=16)) == msg
    assert backbone_problem(BackboneConfig(name="vit_tiny_clbench", image_size=16)) is None


def _hash(*sets: str, folder: Path | None = None) -> str:
    suite = load_suite(folder / "s.yaml" if folder else QUICKSTART, list(sets))
    return suite.protocol_hash()


def test_the_suite_hash_covers_the_weights_a_run_loads(tmp_path):
    suite = load_suite(QUICKSTART)
    assert suite.weights_identity() == weights.pinned_sums()[FNAME]
    assert suite.protocol_identity()["backbone"]["weights"] == weights.pinned_sums()[FNAME]
    random_init = load_suite(QUICKSTART, ["backbone.pretrained=false"])
    assert random_init.weights_identity() == weights.RANDOM_INIT
    assert random_init.protocol_hash() != suite.protocol_hash()
    # a checkpoint file: its checksum, whatever its name
    (tmp_path / "s.yaml").write_text(QUICKSTART.read_text().replace(
        "pretrained: true}", "pretrained: true, checkpoint: w.safetensors}"))
    shutil.copy(weights.weights_dir() / FNAME, tmp_path / "w.safetensors")
    assert load_suite(tmp_path / "s.yaml").weights_identity() == suite.weights_identity()
    same = load_suite(tmp_path / "s.yaml").protocol_hash()
    (tmp_path / "w.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes() + b" ")
    assert load_suite(tmp_path / "s.yaml").protocol_hash() != same


def test_hub_weights_are_identified_by_the_checksum_of_the_cached_file(tmp_path, monkeypatch):
    """The Hugging Face cache names an LFS blob by its sha256; before download the identity says so."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    name = "vit_base_patch16_224.augreg_in21k"
    hub_id = weights.hub_id_of(name)
    assert hub_id == "timm/vit_base_patch16_224.augreg_in21k"
    before = weights.weights_identity(name, 224, None, True, None)
    assert before == f"hub:{hub_id}, not downloaded" and not weights.is_checksum(before)
    digest = "ab" * 32
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(repo / "blobs" / digest)
    assert weights.weights_identity(name, 224, None, True, None) == digest
    assert weights.weights_identity(name, 224, None, False, None) == weights.RANDOM_INIT


def test_dry_run_prints_the_weights_checksum_beside_the_suite_hash():
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "--dry-run"])
    assert result.exit_code == 0, result.output
    suite = load_suite(QUICKSTART)
    [line] = [ln for ln in result.output.splitlines() if " suite hash " in ln]
    assert f"suite hash {suite.protocol_hash()} (the protocol" in line
    assert f"· weights sha256 {weights.pinned_sums()[FNAME][:12]} (in the hash)" in line

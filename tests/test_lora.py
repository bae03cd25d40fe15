"""The shared LoRA layer: injection into timm ViT attention/MLP and merge equivalence."""

import pytest
import torch

from clbench.model.lora import AdaptedLinear, LowRank, find_sites, inject, merge_all
from clbench.testing import tiny_model


def _randomise(sites, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in sites.values():
            for b in site.branches:
                b.B.copy_(torch.randn(b.B.shape, generator=g) * 0.1)
                if b.gain is not None:
                    b.gain.copy_(torch.randn(b.gain.shape, generator=g))


@pytest.mark.parametrize("targets", [["q", "v"], ["k"], ["qkv"], ["proj", "fc1", "fc2"], ["q", "k", "v", "fc2"]])
def test_merge_is_output_identical(targets):
    model = tiny_model().eval()
    x = torch.randn(5, 1, 16, 16)
    sites = inject(model.backbone, targets)
    for s in sites.values():
        s.add_branch(3, scale=2.0)
        s.add_branch(2, gain="vector")
    _randomise(sites)
    model.add_head(4)
    with torch.no_grad():
        before = model(x)
        merge_all(model)
        after = model(x)
    assert all(len(s.branches) == 0 for s in find_sites(model).values())
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


def test_sites_slice_the_fused_qkv_and_freeze_the_backbone():
    model = tiny_model()
    sites = inject(model.backbone, ["q", "k", "v"], blocks=[1])
    assert sorted(sites) == ["blocks.1.attn.k", "blocks.1.attn.q", "blocks.1.attn.v"]
    d = model.backbone.embed_dim
    assert [sites[f"blocks.1.attn.{t}"].rows for t in "qkv"] == [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]
    assert isinstance(model.backbone.blocks[1].attn.qkv, AdaptedLinear)
    assert not isinstance(model.backbone.blocks[0].attn.qkv, AdaptedLinear)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_a_branch_changes_only_its_slice():
    model = tiny_model().eval()
    sites = inject(model.backbone, ["k"])
    lin = model.backbone.blocks[0].attn.qkv
    x = torch.randn(2, 7, lin.base.in_features)
    with torch.no_grad():
        y0 = lin(x)
        b = sites["blocks.0.attn.k"].add_branch(2)
        b.B.normal_()
        y1 = lin(x)
    d = lin.base.out_features // 3
    assert torch.equal(y0[..., :d], y1[..., :d]) and torch.equal(y0[..., 2 * d:], y1[..., 2 * d:])
    assert not torch.allclose(y0[..., d:2 * d], y1[..., d:2 * d])
    expected = y0[..., d:2 * d] + x @ (b.effective_B() @ b.A).t()
    assert torch.allclose(y1[..., d:2 * d], expected, atol=1e-5)


def test_lowrank_difference_and_sum():
    g = torch.Generator().manual_seed(1)
    u = LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))
    v = LowRank(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g))
    assert torch.allclose((u - v).dense(), u.dense() - v.dense(), atol=1e-6)
    assert torch.allclose(LowRank.sum([u, v]).dense(), u.dense() + v.dense(), atol=1e-6)
    assert (u - v).rank == 5


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        inject(tiny_model().backbone, ["query"])

"""clbench.methods.prompts and the prompt methods: the machinery (prefixes, tokens, query pass) and the property that
makes each method that method (L2P's keys pulled toward queries, DualPrompt's G- and E-prompts in their
blocks, CODA-Prompt's attention-weighted components orthogonal to the old ones)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.methods.prompts import attach, cosine, query
from clbench.methods.registry import discover
from clbench.testing import run_method, tiny_model, tiny_stream

REGISTRY = discover(strict=False)


def _cls(name):
    return REGISTRY.methods[name].cls


def _x(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def test_slots_off_leave_the_backbone_unchanged_and_prefixes_change_it():
    model = tiny_model("vit_tiny_clbench")
    bb = model.backbone.eval()
    x = _x()
    before = bb.forward_features(x)
    w = bb.blocks[1].attn.qkv.weight
    slots = attach(bb, [1, 2], tokens=True)
    assert bb.blocks[1].attn.qkv.weight is w  # same parameter object, same name
    assert "blocks.1.attn.qkv.weight" in dict(bb.named_parameters())
    torch.testing.assert_close(bb.forward_features(x), before, atol=1e-5, rtol=1e-5)
    pk = torch.randn(4, 3, 64)
    with slots.active({1: (pk, pk.clone())}):
        prefixed = bb.forward_features(x)
    assert prefixed.shape == before.shape  # prefixes do not lengthen the sequence
    assert (prefixed - before).abs().max() > 1e-3
    torch.testing.assert_close(bb.forward_features(x), before, atol=1e-5, rtol=1e-5)  # switched off again


def test_tokens_go_right_after_cls_and_the_query_pass_has_no_prompts():
    model = tiny_model("vit_tiny_clbench")
    bb = model.backbone.eval()
    x = _x()
    plain = bb.forward_features(x)
    slots = attach(bb, [], tokens=True)
    tok = torch.randn(4, 5, 64)
    with slots.active(tokens=tok):
        out = bb.forward_features(x)
        assert slots.tokens is tok
    assert out.shape[1] == plain.shape[1] + 5
    # the embedding stage sees [CLS], then the 5 prompt tokens, then the patches
    seen = {}
    h = bb.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with slots.active(tokens=tok):
        bb.forward_features(x)
    h.remove()
    torch.testing.assert_close(seen["x"][:, 1:6], tok)
    torch.testing.assert_close(query(bb, x), bb.forward_head(plain, pre_logits=True))


def _key_alignment(run, stream):
    model = run.method.model
    q = query(model.backbone, model.preprocess(stream.tasks[1].train_x[:32]))
    sim = cosine(q, model.keys)
    return float(sim.topk(model.p.top_k, 1).values.mean())


def test_l2p_pulls_selected_keys_toward_queries():
    stream = tiny_stream(samples_per_class=16)
    params = {"pool_size": 6, "length": 4, "top_k": 2}
    untrained = run_method(_cls("l2p")(params), stream, max_steps_per_epoch=1, lr=1e-12)
    trained = run_method(_cls("l2p")(params), stream, max_steps_per_epoch=4, lr=0.05)
    assert _key_alignment(trained, stream) > _key_alignment(untrained, stream) + 0.05
    assert trained.results[1].loss_terms["key_match"] > 0
    assert trained.results[0].updates is None  # no low-rank update


def test_l2p_original_inserts_prompt_tokens_and_pools_them():
    run = run_method(_cls("l2p")({"preset": "original", "pool_size": 4, "length": 3, "top_k": 2}),
                     tiny_stream(samples_per_class=8), max_steps_per_epoch=1)
    m = run.method.model
    assert m.pool == "prompts" and not m.slots.attn
    prefixes, tokens, _ = m.select(torch.randn(5, m.feature_dim))
    assert prefixes == {} and tokens.shape == (5, 2 * 3, m.feature_dim)


def test_dualprompt_g_and_e_prompts_in_their_blocks():
    model = tiny_model("vit_tiny_clbench")  # 4 blocks
    method = _cls("dualprompt")({"g_blocks": [0, 1], "e_blocks": [2, 3], "g_length": 4, "e_length": 6})
    run = run_method(method, tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8), model=model,
                     max_steps_per_epoch=1)
    m = run.method.model
    assert set(m.slots.attn) == {0, 1, 2, 3}
    q = torch.randn(3, m.feature_dim)
    with torch.no_grad():  # make image b's query closest to E-key b in block slot 0, and E-key 2-b in slot 1
        m.e_keys[0].copy_(F.normalize(q, dim=1))
        m.e_keys[1].copy_(F.normalize(q.flip(0), dim=1))
    m.eval()
    prefixes, _, aux = m.select(q)
    assert aux == {}
    for b in (0, 1):  # G-prompt only: length g_length / 2, the same for every image
        assert prefixes[b][0].shape == (3, 2, m.feature_dim)
        torch.testing.assert_close(prefixes[b][0][0], m.g[b][:2])
    for slot, b in enumerate((2, 3)):  # E-prompt only, chosen per image by its own query
        for img in range(3):
            e = img if slot == 0 else 2 - img
            torch.testing.assert_close(prefixes[b][0][img], m.e[slot][e][:3])
            torch.testing.assert_close(prefixes[b][1][img], m.e[slot][e][3:])
    m.train()
    m.task = 1  # training uses the training task's E-prompt, whatever the keys say
    prefixes, _, aux = m.select(q)
    torch.testing.assert_close(prefixes[2][0][0], m.e[0][1][:3])
    expected = sum((1 - cosine(q, k)[:, 1]).sum() for k in m.e_keys)
    torch.testing.assert_close(aux["key_match"], expected)


def test_codaprompt_weights_components_by_attention_and_keeps_new_ones_orthogonal():
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)
    method = _cls("codaprompt")({"pool_size": 8, "length": 4, "blocks": [0, 1]})
    run = run_method(method, stream, max_steps_per_epoch=2, lr=0.05)
    m = run.method.model
    assert m.per_task == 4 and m.task == 1
    for group in (m.P, m.K, m.A):  # task 1's components were initialised orthogonal to task 0's
        for chunks in group:
            assert not chunks[0].requires_grad and chunks[1].requires_grad
    fresh = m.P[0][0].detach().flatten(1)
    m.start_task(1)  # redo the task-1 initialisation to look at it before training
    for group in (m.P, m.K, m.A):
        old, new = group[0][0].detach().flatten(1), group[0][1].detach().flatten(1)
        assert (old @ new.T).abs().max() < 1e-5
        torch.testing.assert_close(new @ new.T, torch.eye(4), atol=1e-5, rtol=0)
    assert torch.equal(m.P[0][0].detach().flatten(1), fresh)  # old chunk untouched
    q = torch.randn(3, m.feature_dim)
    m.eval()
    prefixes, _, _ = m.select(q)
    P, K, A = m.components(0)
    assert P.shape[0] == 8  # both tasks' components at evaluation
    alpha = torch.stack([torch.stack([F.cosine_similarity(q[b] * A[k], K[k], dim=0) for k in range(8)])
                         for b in range(3)])
    weighted = torch.einsum("bk,kld->bld", alpha, P)
    torch.testing.assert_close(prefixes[0][0], weighted[:, :2])
    torch.testing.assert_close(prefixes[0][1], weighted[:, 2:])


def test_codaprompt_trains_only_the_current_chunk():
    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8)
    snapshots = []

    class Spy(_cls("codaprompt")):
        from clbench.methods.hookspecs import hookimpl

        @hookimpl
        def after_task(self, model, ctx):
            snapshots.append([c.detach().clone() for c in model.P[0]])

    Spy.name = "spy"
    run_method(Spy({"pool_size": 8, "length": 4, "blocks": [0]}), stream, max_steps_per_epoch=2, lr=0.05)
    assert torch.equal(snapshots[0][0], snapshots[1][0])  # task 0's chunk frozen through task 1
    assert not torch.equal(snapshots[0][1], snapshots[1][1])  # task 1's chunk re-initialised and trained


def test_parent_run_logs_how_many_runs_the_spectra_statistics_left_out_and_why():
    from clbench.analysis import leaderboard as lb
    from clbench.run.summary import spectra_exclusions

    def row(name, low_rank, top1):
        runs = [{"run_id": f"{name}{s}", "seed": s, "values": {"spectra/mean_top1_share": top1}, "curve": []}
                for s in (0, 1)]
        return lb.Row(method=name, method_name=name, params_id="p", n=2, seeds=[0, 1], metrics={},
                      provenance={}, runs=runs, low_rank=low_rank)

    group = lb.Group("e", ["s"], "h", [row("lora", True, 0.5), row("l2p", False, None),
                                       row("dualprompt", False, None)], [], "final/acc")
    n, why = spectra_exclusions(group)
    assert n == 4
    assert "no low-rank update: l2p (2), dualprompt (2)" in why
    assert spectra_exclusions(lb.Group("e", ["s"], "h", [row("lora", True, 0.5)], [], "final/acc")) == (0, "")

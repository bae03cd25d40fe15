"""Language backbones on the common loop (clbench.model.lm): LoRA sites on the attention projections of a T5 and a
LLaMA-style causal LM, frozen base weights, O-LoRA's orthogonality on a language model, exact-match evaluation,
generation against likelihood scoring, a bit-exact resume mid-stream, and the quickstart suites' plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the language-model extra is not installed: pip install 'clbench[lm]'")

from clbench.model.lm import build_language_model, normalize_answer  # noqa: E402
from clbench.model.lora import find_sites, inject  # noqa: E402
from clbench.testing import assert_resumes, builtin_method, model_and_stream, run_method, tiny_text_case  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name, sites", [("t5_tiny_clbench", 2 * 4 + 2 * 2 * 4), ("llama_tiny_clbench", 2 * 4)])
def test_sites_on_every_attention_projection_and_base_frozen(name, sites):
    """T5: 2 encoder blocks (self-attention) + 2 decoder blocks (self- and cross-attention); LLaMA: 2 layers."""
    torch.manual_seed(0)
    model = build_language_model(name)
    found = inject(model.backbone, ["q", "k", "v", "o"])
    assert len(found) == sites and find_sites(model) == found
    for site_name, site in found.items():
        assert site.weight.shape == (64, 64) and (site.d_out, site.d_in) == (64, 64)
        assert site_name.split(".")[2] in ("attn", "cross_attn") and site_name.endswith(site.name[-1])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # blocks pick sites: block 0 only (T5's first encoder block: one attention)
    torch.manual_seed(0)
    only = inject(build_language_model(name).backbone, ["q", "v"], blocks=[0])
    assert sorted(only) == ["blocks.0.attn.q", "blocks.0.attn.v"]
    with pytest.raises(ValueError, match="not an attention projection"):
        inject(build_language_model(name).backbone, ["fc1"])


def test_training_changes_only_the_adapters():
    case = tiny_text_case(2)
    model, _ = model_and_stream(case)
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    run = run_method(builtin_method("lora")({"rank": 2}), stream=case, model=model, max_steps_per_epoch=3)
    after = run.model.backbone.state_dict()
    lora_keys = [k for k in after if ".branches." in k]
    assert lora_keys and any(after[k].abs().sum() > 0 for k in lora_keys if k.endswith(".B"))
    for k, v in base.items():
        key = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[key], v), k


def test_olora_penalty_makes_new_subspaces_more_orthogonal_on_a_language_model():
    case = tiny_text_case(2, per_class=12)
    with_orth, without = (builtin_method("olora")({"rank": 4, "lambda1": lam}) for lam in (0.5, 0.0))
    for method in (with_orth, without):
        run_method(method, stream=case, epochs=3, lr=1e-2)

    def l1(method) -> float:  # O-LoRA's loss term: sum |A_old A_new^T| per site, averaged over sites
        return float(np.mean([float((A[:4] @ A[4:8].t()).abs().sum()) for A in method.old_A.values()]))

    assert len(with_orth.old_A) == 2 * (2 + 2 * 2)  # q and v of every attention: 2 encoder, 2 x 2 decoder
    assert l1(with_orth) < 0.5 * l1(without)


def test_exact_match_after_olora_normalisation():
    assert normalize_answer(" The  Sports. ") == "sports" and normalize_answer("an Apple, pie") == "apple pie"
    model, stream = model_and_stream(tiny_text_case(2))
    for task in stream.tasks:
        model.add_task_head(task)
    generated = ["Sports", "the music", "xyz", "food .", "GOOD", "mixed!"]
    model.generate = lambda x, max_tokens=None: generated[: len(x)]
    x = stream.tasks[0].test_x[:6]
    cil, til = model.predict(x, n_seen=6, lo=0, hi=3)
    # task 0's words: sports, music, food (0, 1, 2); task 1's: good, bad, mixed (3, 4, 5)
    assert cil.tolist() == [0, 1, -1, 2, 3, 5] and torch.equal(cil, til)
    # a word of a task not seen yet is no prediction
    assert model.predict(x, n_seen=3, lo=0, hi=3)[0].tolist() == [0, 1, -1, 2, -1, -1]


@pytest.mark.parametrize("name", ["t5_tiny_clbench", "llama_tiny_clbench"])
def test_generation_and_likelihood_scoring_agree_once_trained(name):
    case = tiny_text_case(1, name, per_class=40)
    run = run_method(builtin_method("lora")({"rank": 8, "targets": ["q", "k", "v", "o"]}), stream=case, epochs=20,
                     lr=1e-2)
    model, stream = run.model, None
    _, stream = model_and_stream(case)
    x, y = stream.tasks[0].test_x, stream.tasks[0].test_y
    model.eval()
    with torch.inference_mode():
        gen, _ = model.predict(x, 3, 0, 3)
        texts = model.generate(x)
        assert texts == model.generate(x, kv_cache=False) and any(texts)  # cached decoding: the same choices
        model.eval_mode = "likelihood"
        lik, lik_til = model.predict(x, 3, 0, 3)
    agree = float((gen == lik).float().mean())
    acc = float((gen == y).float().mean())
    assert acc > 0.6, acc  # chance: 1/3
    assert agree > 0.9, agree  # measured: 1.0 (t5), ~0.95 (llama)
    assert torch.equal(lik, lik_til)  # one task seen: class- and task-incremental scoring are the same


def test_resume_mid_stream_is_bit_exact():
    assert_resumes(builtin_method("olora"), {"rank": 2}, after=1, stream=tiny_text_case(3), max_steps_per_epoch=2)
    assert_resumes(builtin_method("lora"), {"rank": 2, "targets": ["q", "o"]}, after=2,
                   stream=tiny_text_case(3, "llama_tiny_clbench"), max_steps_per_epoch=2)


def test_quickstart_group_plans_both_backbones(tmp_path, monkeypatch):
    """`clbench run suites/lm-quickstart.yaml --dry-run`: the group plans the four methods on the tiny T5 suite,
    then on the tiny causal LM suite (each one protocol of its own)."""
    from typer.testing import CliRunner

    from clbench.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = str(pytest.importorskip("pathlib").Path(__file__).parent.parent / "suites" / "lm-quickstart.yaml")
    result = CliRunner().invoke(app, ["run", path, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    heads = [i for i, ln in enumerate(lines) if ln.startswith("suite lm-quickstart")]
    assert [lines[i].split(":")[0] for i in heads] == ["suite lm-quickstart", "suite lm-quickstart-causal"]
    for start, end in zip(heads, [*heads[1:], len(lines)]):
        planned = [ln.split()[1] for ln in lines[start:end] if ln.startswith("  run ")]
        assert planned == ["lora", "inflora", "olora", "eblora"], result.output


def test_hub_model_offline_fails_in_one_line(tmp_path, monkeypatch):
    from clbench.errors import ClbenchError

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ClbenchError, match="not in the Hugging Face cache"):
        build_language_model("hf:t5-large", pretrained=True)


@pytest.mark.parametrize("backbone, params, problem", [
    ("{name: t5_tiny_clbench, pretrained: false}", "{rank: 4, targets: [q, fc1]}", "not an attention projection"),
    ("{name: t5_tiny_clbench, pretrained: false}", "{rank: 4, blocks: [4]}", "block 4 does not exist; the backbone "
                                                                            "has 4 blocks"),
    ("{name: llama_tiny_clbench, pretrained: false}", "{rank: 65}", "rank at most 64"),
    ("{name: vit_micro_clbench, image_size: 16, pretrained: false}", "{rank: 2, targets: [q, o]}", "a ViT's is 'proj'"),
])
def test_params_that_do_not_fit_the_language_backbone_fail_before_any_run(backbone, params, problem, tmp_path):
    from clbench.errors import ClbenchError
    from clbench.methods.registry import discover
    from clbench.run.plan import plan_runs
    from clbench.run.preflight import method_problems
    from clbench.suite import load_suite

    stream = "lm_synthetic, num_tasks: 2" if "vit" not in backbone else "synthetic, num_tasks: 2, num_classes: 4"
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nseeds: [0]\nstream: {{name: {stream}}}\nbackbone: {backbone}\n"
                    f"methods:\n  - {{name: lora, params: {params}}}\n")
    suite = load_suite(path)
    with pytest.raises(ClbenchError, match=problem):
        method_problems(suite, plan_runs(suite, str(path), discover([]), None), str(path))


def test_t5_decoding_reuses_the_encoder_output_exactly():
    model, stream = model_and_stream(tiny_text_case(2))
    task = stream.tasks[1]
    prompt = task.test_x[:, : model.backbone.source_len]
    target = task.target_ids[task.test_y - task.classes[0]]
    model.eval()
    with torch.no_grad():
        whole = model.backbone(prompt, target)
        reused = model.backbone(prompt, target, model.backbone.encode(prompt))
    assert torch.equal(whole, reused)


@pytest.mark.parametrize("name", ["t5_tiny_clbench", "llama_tiny_clbench"])
def test_decoding_with_kept_keys_and_values_chooses_what_rerunning_every_token_chooses(name):
    """``TextBackbone.next_logits`` runs one token per step on the kept keys and values; fed a target token by
    token, it gives the logits ``forward`` gives for the whole target at once (up to float summation order, as
    the shapes differ) and the same choice at every position of every row, padded prompts included; greedy
    decoding of a random LLaMA (peaked logits, a dozen words per row) chooses the same text either way."""
    model, stream = model_and_stream(tiny_text_case(2, name))
    x = torch.cat([task.test_x for task in stream.tasks])
    prompt = x[:, : model.backbone.source_len]
    target = torch.randint(4, 40, (len(x), 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        whole = model.backbone(prompt, target, model.backbone.encode(prompt))
        encoded, cache = model.backbone.encode(prompt), {}
        steps = [model.backbone.next_logits(prompt, target[:, s - 1: s] if s else None, encoded, cache)
                 for s in range(target.shape[1])]
    stepped = torch.stack(steps, 1)
    assert torch.allclose(stepped, whole, atol=1e-5, rtol=1e-5), float((stepped - whole).abs().max())
    assert torch.equal(stepped.argmax(-1), whole.argmax(-1))
    if name == "llama_tiny_clbench":
        texts = model.generate(x, max_tokens=12)
        assert texts == model.generate(x, max_tokens=12, kv_cache=False)
        assert sum(len(t.split()) for t in texts) > 5 * len(x)


def test_a_validation_split_of_a_text_stream_is_refused_in_one_line():
    from pathlib import Path

    from clbench.data.validation import build_run_stream
    from clbench.errors import ClbenchError
    from clbench.suite import load_suite

    suite = load_suite(Path(__file__).resolve().parents[1] / "suites" / "lm-quickstart-t5.yaml").for_validation()
    with pytest.raises(ClbenchError, match="cannot hold out a validation split of a text stream"):
        build_run_stream(suite, 0)


def test_rehearsal_on_a_language_model_is_refused_in_one_line():
    """ER's own buffer refuses token rows (its samples are images) before the loop's refusal of replayed rows."""
    from clbench.errors import ClbenchError

    with pytest.raises(ClbenchError) as err:
        run_method(builtin_method("er")(), stream=tiny_text_case(2), max_steps_per_epoch=2)
    assert "\n" not in str(err.value) and "method 'er'" in str(err.value)


@pytest.mark.parametrize("name", ["t5_tiny_clbench", "llama_tiny_clbench"])
def test_a_rows_scores_do_not_depend_on_its_batchs_padding(name):
    model, stream = model_and_stream(tiny_text_case(2, name))
    for task in stream.tasks:
        model.add_task_head(task)
    x = torch.cat([stream.tasks[0].test_x, stream.tasks[1].test_x])
    lengths = (x[:, : model.backbone.source_len] != model.backbone.pad_id).sum(1)
    short = int(lengths.argmin())
    model.eval()
    with torch.no_grad():
        alone, together = model(x[short:short + 1]), model(x)[short:short + 1]
    assert torch.allclose(alone, together, atol=1e-4, rtol=1e-5)
    assert model.backbone.trim(x[short:short + 1, : model.backbone.source_len]).shape[1] == int(lengths[short])


def test_prompts_carry_olora_special_tokens_and_keep_them_when_cut():
    model, _ = model_and_stream(tiny_text_case(1))
    model.max_source_length = 5
    ids = model.prompt_ids("what is the topic of the sentence ?")
    assert len(ids) == 5 and ids[-1] == model.tokenizer.eos_id  # T5: the source ends with </s>, kept when cut


def _saved_model(folder, family: str = "t5_tiny_clbench") -> None:
    """A tiny model and a word-level tokenizer written as transformers writes a hub model's folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clbench.data.lm_synthetic import VOCABULARY

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *VOCABULARY])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(3)
    build_language_model(family).backbone.hf.save_pretrained(folder)


def test_a_local_transformers_folder_loads_with_its_own_tokenizer_and_trains(tmp_path):
    from clbench.data.lm_synthetic import synthetic_text_stream
    from clbench.weights import file_sha256, weights_identity

    _saved_model(tmp_path / "t5")
    name = f"hf:{tmp_path / 't5'}"
    model = build_language_model(name, pretrained=True)
    saved = build_language_model("t5_tiny_clbench")  # the same config, other weights
    assert type(model.tokenizer).__name__ == "HubTokenizer" and model.backbone.family == "t5"
    assert not torch.equal(model.backbone.hf.shared.weight, saved.backbone.hf.shared.weight)
    assert weights_identity(name, 0, None, True, None) == file_sha256(tmp_path / "t5" / "model.safetensors")
    stream = model.encode(synthetic_text_stream(1, 8, 4))
    ids = model.prompt_ids("what is the topic of the sentence ?")
    assert ids[-1] == model.tokenizer.eos_id and model.tokenizer.unk_id not in ids  # its tokenizer, its </s>
    run = run_method(builtin_method("lora")({"rank": 2}), stream=stream, model=model, max_steps_per_epoch=2)
    assert np.isfinite(run.results[0].loss) and run.R.shape == (1, 1)
    with pytest.raises(Exception, match="holds no config.json"):
        build_language_model(f"hf:{tmp_path}", pretrained=True)


def test_the_tiny_tokenizer_knows_every_word_of_the_synthetic_tasks():
    from clbench.data.lm_synthetic import VOCABULARY, synthetic_text_stream
    from clbench.model.lm import WordTokenizer

    tok = WordTokenizer(VOCABULARY)
    stream = synthetic_text_stream(4, 5, 2)
    for task in stream.tasks:
        for e in task.train + task.test:
            assert tok.unk_id not in tok.encode(e.text), e.text
        assert all(tok.decode(tok.encode(w)) == w for w in task.labels)


@pytest.mark.parametrize("name", ["t5_tiny_clbench", "llama_tiny_clbench"])
def test_inflora_covariance_counts_real_tokens_only(name):
    """InfLoRA's covariance pass over a batch of prompts of different lengths sums and counts exactly what its rows
    give one at a time (alone, a row has no padding): padding positions are neither summed nor counted. An encoder
    site (and a cross-attention's k, v) counts the prompts' tokens, a decoder site the target's, a causal LM's site
    both."""
    from clbench_plugins.inflora import CovarianceCollector

    model, stream = model_and_stream(tiny_text_case(1, name))
    bb = model.backbone
    owners = {n: s.owner for n, s in inject(bb, ["q", "k", "v", "o"]).items()}
    task = stream.tasks[0]
    x = task.train_x[:16]
    prompt, target = x[:, : bb.source_len], x[:, bb.source_len:]
    assert len(set((prompt != bb.pad_id).sum(1).tolist())) > 1  # the batch holds padding
    with torch.no_grad():
        with CovarianceCollector(owners, token_mask=bb.token_mask) as batched:
            bb(x)
        with CovarianceCollector(owners, token_mask=bb.token_mask) as single:
            for row in x:
                bb(row[None])
    n_prompt, n_target = int((prompt != bb.pad_id).sum()), int((target != bb.pad_id).sum())
    for key in owners:
        assert batched.counts[key] == single.counts[key], key
        both, alone = batched.sums[key], single.sums[key]  # float32 activations: equal up to rounding
        assert float((both - alone).abs().max()) <= 1e-5 * float(alone.abs().max()), key
    if name.startswith("t5"):
        assert batched.counts["blocks.0.attn.q"] == n_prompt and batched.counts["blocks.2.attn.q"] == n_target
        assert batched.counts["blocks.2.cross_attn.q"] == n_target
        assert batched.counts["blocks.2.cross_attn.k"] == batched.counts["blocks.2.cross_attn.v"] == n_prompt
    else:
        assert batched.counts["blocks.0.attn.q"] == n_prompt + n_target

"""Language backbones on the common loop: an encoder-decoder T5 or a decoder-only LLaMA-style causal LM through
Hugging Face transformers, trained and evaluated on text tasks as O-LoRA does (github.com/cmnfriend/O-LoRA).

Names (``backbone.name``):

* ``t5_tiny_clbench``, ``llama_tiny_clbench``: tiny models built from a config (2 blocks, width 64; random
  weights from the run's seed) with a word-level tokenizer over ``clbench.data.lm_synthetic.VOCABULARY`` (no
  file, no hub): the offline quickstart (``suites/lm-quickstart*.yaml``) and the tests.
* ``hf:<hub id>`` (``hf:t5-large``, ``hf:google-t5/t5-large``, ``hf:meta-llama/Llama-2-7b-hf``) or
  ``hf:<local folder>`` (a ``save_pretrained`` folder with its tokenizer, as O-LoRA's ``initial_model/t5-large``):
  the model and its tokenizer (T5 family: encoder-decoder; any other ``AutoModelForCausalLM``: causal), a hub
  model downloaded into the Hugging Face cache on a connected machine before the suite hash is taken (which covers
  the weights' sha256, ``clbench.weights.language_weights_identity``); offline without them it fails at once
  with one line.

transformers is the optional extra ``clbench[lm]`` and is imported only inside this module's functions.

How a text task meets the loop (which stays one loop, ``clbench.run.loop``):

* **rows**: ``LanguageModel.encode(TextStream)`` tokenizes a stream once into the loop's ``Stream`` of tensors:
  every row is ``[prompt | target]`` token ids, the prompt (``prompt_ids``: O-LoRA's special tokens, cut to
  ``backbone.max_source_length``) padded to the stream's longest prompt L (each batch runs at its own longest:
  ``TextBackbone.trim``), the target (the label word's tokens + end of sequence, padded to T) the gold
  answer on training rows and padding on test rows. Labels are global class ids as for images.
* **heads**: task t's head (:class:`LabelHead`) holds the tokens of its label words (and a per-class offset that
  only a method's own probe trains); ``head(model.features(x))`` is the task's candidate scores: the summed
  log-likelihood of every label word's tokens after the prompt.
* **training loss** (``LanguageModel.train_loss``, O-LoRA's): teacher-forced cross-entropy over the vocabulary on
  the target's tokens (mean over tokens, the end-of-sequence token included), the prompt not scored.
* **evaluation** (``LanguageModel.predict``), as ``backbone.lm_eval`` says: ``generate`` (default, O-LoRA's):
  greedy decoding of at most T tokens, the text compared with the label words by exact match after O-LoRA's
  normalisation (lower case, articles and punctuation removed, whitespace collapsed); a generation that is no
  seen label word is wrong. ``likelihood`` (faster, an option, not O-LoRA's): the seen label word of highest
  summed log-likelihood; class-incremental over every seen task's words, task-incremental over the task's own.
  With ``generate`` the class- and task-incremental accuracies are the same number (the instruction names the task).
* **LoRA sites**: :class:`TextBackbone` lists its transformer blocks (T5: the encoder's, then the decoder's; LLaMA:
  its layers) and the attention projections of each as targets ``q``, ``k``, ``v``, ``o``;
  ``clbench.model.lora.inject`` wraps them as for a ViT, so the adapter methods run unchanged. Sites are named
  ``blocks.{i}.attn.{t}`` (self-attention) and ``blocks.{i}.cross_attn.{t}`` (a T5 decoder block's attention over
  the encoder output, adapted as PEFT's ``target_modules=["q", "v"]`` adapts it).

Training and the covariance passes go through ``TextBackbone.forward``; decoding and candidate scoring of a T5 run
its encoder once per batch (``TextBackbone.encode``) and then ``forward`` per step or candidate (greedy, no
key-value cache: labels are a few tokens).
"""

from __future__ import annotations

import inspect
import os
import re
import string
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.data.streams import Stream, TaskData
from clbench.errors import ClbenchError
from clbench.model.backbones import CLModel, model_from

HF_PREFIX = "hf:"
# the tiny language backbones: family and shape (2 blocks, width 64)
LM_TINY: dict[str, dict[str, Any]] = {
    "t5_tiny_clbench": {"family": "t5", "d_model": 64, "layers": 2, "heads": 4, "d_ff": 128},
    "llama_tiny_clbench": {"family": "llama", "d_model": 64, "layers": 2, "heads": 4, "d_ff": 128},
}
LM_TARGETS = ("q", "k", "v", "o")
# the tiny LLaMA's weight init std: at LLaMA's 0.02 the output layer's logits cannot exceed ~1.3 at width 64 (the
# final RMSNorm caps the hidden norm at sqrt(64)), so no adapter could make an answer likely; 0.2 lets them
INIT_RANGE = 0.2
EXTRA = "pip install 'clbench[lm]'"


def is_language_backbone(name: str) -> bool:
    return name in LM_TINY or name.startswith(HF_PREFIX)


def backbone_kind(name: str) -> str:
    """The kind of backbone a suite's ``backbone.name`` names, as methods declare what they run on
    (``clbench.Method.backbones``): ``"language"`` or ``"image"``."""
    return "language" if is_language_backbone(name) else "image"


def require_transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ClbenchError(f"backbone.name: {name} is a language model, which needs the language-model extra: "
                           f"{EXTRA}") from None
    return transformers


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------

class WordTokenizer:
    """A word-level tokenizer over a fixed vocabulary (ids 0 pad, 1 end of sequence, 2 unknown, as T5's); words
    and single punctuation marks, lower case (``clbench.data.lm_synthetic.words``)."""

    def __init__(self, vocabulary: tuple[str, ...]) -> None:
        self.vocab = ["<pad>", "</s>", "<unk>", *vocabulary]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.bos_id = None  # no beginning-of-sequence token (as T5's)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        from clbench.data.lm_synthetic import words

        return [self.index.get(w, self.unk_id) for w in words(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i > self.unk_id)


class HubTokenizer:
    """A hub model's own tokenizer (transformers' AutoTokenizer) behind the same small interface; a tokenizer
    without a padding token pads with its unknown token (never with end of sequence, which targets end with)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_id, self.bos_id, self.unk_id = tok.eos_token_id, tok.bos_token_id, tok.unk_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        if pad is None or pad == self.eos_id:
            pad = 0 if self.eos_id != 0 else 1
        self.pad_id = pad

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """O-LoRA's exact-match normalisation (its ``compute_metrics``, from SQuAD's): lower case, no punctuation, no
    articles, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


# ----------------------------------------------------------------------------------------------------
# The backbone: a transformers model behind one forward
# ----------------------------------------------------------------------------------------------------

class TextBackbone(nn.Module):
    """A transformers model (``hf``) of family ``t5`` (encoder-decoder) or ``causal``; ``forward(x)`` on packed
    ``[prompt | target]`` rows (``source_len`` prompt columns) returns the logits that predict every target token
    from the prompt and the target tokens before it (N x T x vocabulary). ``blocks`` (a plain list, not
    submodules) are the transformer blocks LoRA's ``blocks`` param counts: T5's encoder blocks, then its decoder
    blocks; a causal LM's layers."""

    def __init__(self, hf: nn.Module, family: str, pad_id: int) -> None:
        super().__init__()
        self.hf, self.family, self.pad_id = hf, family, pad_id
        self.source_len = 0  # set by LanguageModel.encode
        self._masks: dict[str, torch.Tensor] = {}  # the last forward's real positions (token_mask)
        self._parts: dict[int, str] = {}  # module id -> which positions its input holds (token_mask)
        cfg = hf.config
        self.num_features = self.embed_dim = int(getattr(cfg, "d_model", 0) or cfg.hidden_size)
        if family == "t5":
            blocks = [*hf.encoder.block, *hf.decoder.block]
        else:
            blocks = list(hf.model.layers)
        object.__setattr__(self, "blocks", blocks)  # the same modules as hf's, not registered twice

    def attention_linears(self, i: int, target: str) -> list[tuple[str, nn.Module, str]]:
        """The (site name, parent module, attribute) of target ``target`` (q, k, v, o) in block ``i``."""
        if target not in LM_TARGETS:
            raise ValueError(f"LoRA target '{target}' is not an attention projection of a language backbone; "
                             f"choose from {list(LM_TARGETS)}")
        block = self.blocks[i]
        if self.family == "t5":
            out = [(f"blocks.{i}.attn.{target}", block.layer[0].SelfAttention, target)]
            if len(block.layer) == 3:  # a decoder block: self-attention, attention over the encoder, MLP
                out.append((f"blocks.{i}.cross_attn.{target}", block.layer[1].EncDecAttention, target))
            return out
        return [(f"blocks.{i}.attn.{target}", block.self_attn, f"{target}_proj")]

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the target tokens; ``target`` None: the packed rows' own (``x[:, source_len:]``). A T5 given
        ``encoded`` (``encode(prompt)``'s output) runs its decoder only."""
        prompt = x[:, : self.source_len] if target is None or x.shape[1] > self.source_len else x
        if target is None:
            target = x[:, self.source_len:]
        prompt = self.trim(prompt)
        mask = (prompt != self.pad_id).long()
        scored = target != self.pad_id  # the positions that read a label token (or its end of sequence)
        if self.family == "t5":
            self._masks = {"source": mask.bool(), "target": scored}
            start = torch.full_like(target[:, :1], self.hf.config.decoder_start_token_id)
            decoder_in = torch.cat([start, target[:, :-1]], 1)
            if encoded is not None:
                return self.hf(encoder_outputs=(encoded,), attention_mask=mask, decoder_input_ids=decoder_in,
                               use_cache=False).logits
            return self.hf(input_ids=prompt, attention_mask=mask, decoder_input_ids=decoder_in,
                           use_cache=False).logits
        seq = torch.cat([prompt, target], 1)
        self._masks = {"all": torch.cat([mask.bool(), scored], 1)}
        full = torch.cat([mask, torch.ones_like(target)], 1)
        pos = (full.cumsum(1) - 1).clamp(min=0)
        logits = self.hf(input_ids=seq, attention_mask=full, position_ids=pos, use_cache=False).logits
        L = prompt.shape[1]
        return logits[:, L - 1: L - 1 + target.shape[1]]

    def token_mask(self, module: nn.Module) -> torch.Tensor | None:
        """The real positions (N x S, bool; padding False) of ``module``'s input in the last ``forward``: the
        prompt's for a T5 encoder module and a cross-attention's ``k`` and ``v`` (they read the encoder output),
        the target's for any other decoder module (position j reads the token before target token j; True where
        target token j is a label token or its end of sequence, the positions the loss scores), the packed
        ``[prompt | target]`` row's for a causal LM. InfLoRA's covariance pass counts these positions only, so a
        row's share does not depend on how long the other prompts of its batch are. None: not a module of this
        model."""
        if id(module) not in self._parts:
            self._parts = self._position_parts()
        part = self._parts.get(id(module))
        return None if part is None or part not in self._masks else self._masks[part]

    def _position_parts(self) -> dict[int, str]:
        if self.family != "t5":
            return {id(m): "all" for m in self.hf.modules()}
        parts = {id(m): "source" for m in self.hf.encoder.modules()}
        parts.update({id(m): "target" for m in self.hf.decoder.modules()})
        for block in self.hf.decoder.block:
            for name in ("k", "v"):
                parts.update({id(m): "source" for m in getattr(block.layer[1].EncDecAttention, name).modules()})
        return parts

    def next_logits(self, prompt: torch.Tensor, last: torch.Tensor | None, encoded: torch.Tensor | None,
                    cache: dict[str, Any]) -> torch.Tensor:
        """Greedy decoding's next-token logits (N x vocabulary) with the keys and values of the tokens before kept in
        ``cache`` (transformers' ``past_key_values``; an empty dict at the first step): only ``last``, the token
        chosen at the step before (None at the first step), runs through the model, where ``forward`` would rerun
        the prompt and every token generated so far. The same positions and masks as ``forward``'s."""
        if self.family == "t5":
            mask = (self.trim(prompt) != self.pad_id).long()
            if last is None:
                last = torch.full_like(prompt[:, :1], self.hf.config.decoder_start_token_id)
            out = self.hf(encoder_outputs=(encoded,), attention_mask=mask, decoder_input_ids=last, use_cache=True,
                          **self._past(cache))
        elif last is None:  # the prompt, once
            prompt = self.trim(prompt)
            mask = (prompt != self.pad_id).long()
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            cache["mask"], cache["pos"] = mask, pos[:, -1:]
            out = self.hf(input_ids=prompt, attention_mask=mask, position_ids=pos, use_cache=True)
        else:  # one token at the position after the last
            cache["mask"] = torch.cat([cache["mask"], torch.ones_like(last)], 1)
            cache["pos"] = cache["pos"] + 1
            out = self.hf(input_ids=last, attention_mask=cache["mask"], position_ids=cache["pos"], use_cache=True,
                          **self._past(cache))
        cache["past"] = out["cache"] if "cache" in out else out.past_key_values
        return out.logits[:, -1]

    def _past(self, cache: dict[str, Any]) -> dict[str, Any]:
        """The keys and values kept so far as the model's forward names them: ``cache`` since transformers 5.2x
        (which warns on the older ``past_key_values``), ``past_key_values`` before."""
        if "past" not in cache:
            return {}
        if "cache_kw" not in cache:
            names = inspect.signature(self.hf.forward).parameters
            cache["cache_kw"] = "cache" if "cache" in names else "past_key_values"
        return {cache["cache_kw"]: cache["past"]}

    def encode(self, prompt: torch.Tensor) -> torch.Tensor | None:
        """A T5's encoder output for ``prompt`` (reused by every decoding step and candidate); None for a causal
        LM, which has no separate encoder."""
        if self.family != "t5":
            return None
        prompt = self.trim(prompt)
        return self.hf.encoder(input_ids=prompt, attention_mask=(prompt != self.pad_id).long()).last_hidden_state

    def trim(self, prompt: torch.Tensor) -> torch.Tensor:
        """The batch's prompts without the columns that are padding in every row (a T5's trailing ones, a causal
        LM's leading ones): each batch padded to its own longest prompt, as O-LoRA's collator pads, not to the
        stream's. The rows' real tokens, their positions and their outputs are the same either way."""
        real = (prompt != self.pad_id).any(0).nonzero()
        if len(real) == 0:
            return prompt[:, :1]
        return prompt[:, : int(real[-1]) + 1] if self.family == "t5" else prompt[:, int(real[0]):]


def _tiny_hf(name: str, vocab: int, pad_id: int, eos_id: int) -> tuple[nn.Module, str]:
    spec = LM_TINY[name]
    tf = require_transformers(name)
    if spec["family"] == "t5":
        cfg = tf.T5Config(vocab_size=vocab, d_model=spec["d_model"], d_kv=spec["d_model"] // spec["heads"],
                          d_ff=spec["d_ff"], num_layers=spec["layers"], num_decoder_layers=spec["layers"],
                          num_heads=spec["heads"], dropout_rate=0.0, pad_token_id=pad_id, eos_token_id=eos_id,
                          decoder_start_token_id=pad_id, tie_word_embeddings=False)
        return tf.T5ForConditionalGeneration(cfg), "t5"
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=spec["d_model"], intermediate_size=spec["d_ff"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["heads"], max_position_embeddings=256, pad_token_id=pad_id,
                         eos_token_id=eos_id, bos_token_id=eos_id, tie_word_embeddings=False,
                         initializer_range=INIT_RANGE)
    return tf.LlamaForCausalLM(cfg), "causal"


def hub_available(hub_id: str) -> None:
    """Fail fast, with one line, when a hub model is neither a local folder, nor in the Hugging Face cache, nor
    downloadable now."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    if Path(hub_id).is_dir():
        if not (Path(hub_id) / "config.json").is_file():
            raise ClbenchError(f"backbone.name: {hub_id} holds no config.json; give a folder written by a "
                               "transformers model's save_pretrained (with its tokenizer)")
        return
    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    from clbench.model.backbones import _hub_reachable

    if offline or not _hub_reachable():
        raise ClbenchError(f"backbone.name: the language model '{hub_id}' is not in the Hugging Face cache and the "
                           "hub cannot be reached; run once on a connected machine (it downloads into the cache) "
                           "or name a local folder: hf:/path/to/model")


def _hub_hf(name: str, pretrained: bool) -> tuple[nn.Module, Any, str]:
    tf = require_transformers(name)
    hub_id = name[len(HF_PREFIX):]
    hub_available(hub_id)
    try:
        config = tf.AutoConfig.from_pretrained(hub_id)
        tok = tf.AutoTokenizer.from_pretrained(hub_id)
        if getattr(config, "is_encoder_decoder", False):
            if config.model_type not in ("t5", "mt5", "umt5"):
                raise ClbenchError(f"backbone.name: {hub_id} is a {config.model_type} encoder-decoder; clbench's "
                                   "language backbones are T5-family encoder-decoders and causal LMs")
            cls, family = tf.AutoModelForSeq2SeqLM, "t5"
        else:
            cls, family = tf.AutoModelForCausalLM, "causal"
        hf = cls.from_pretrained(hub_id) if pretrained else cls.from_config(config)
    except OSError as exc:
        raise ClbenchError(f"backbone.name: cannot load '{hub_id}' from the Hugging Face hub or cache "
                           f"({str(exc).splitlines()[0][:160]})") from None
    return hf, tok, family


# ----------------------------------------------------------------------------------------------------
# The model the loop trains
# ----------------------------------------------------------------------------------------------------

@dataclass
class TextTaskData(TaskData):
    """A tokenized text task: ``TaskData`` rows (packed ``[prompt | target]`` ids) plus its label words and their
    target tokens (C x T: tokens + end of sequence, padded)."""

    labels: tuple[str, ...] = ()
    target_ids: torch.Tensor | None = None


class LabelHead(nn.Module):
    """Task t's head on a language model: its label words' target tokens and a per-class offset (zero; trained
    only by a method that fits a copy of a head itself, as EBLoRA's probe). ``forward(features)`` is the task's
    candidate scores (N x C): each label word's summed log-likelihood after the prompt, plus the offset."""

    def __init__(self, target_ids: torch.Tensor, scorer: LanguageModel) -> None:
        super().__init__()
        self.register_buffer("target_ids", target_ids, persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(target_ids)))
        object.__setattr__(self, "_scorer", scorer)  # not a submodule: the model owns the head

    def __deepcopy__(self, memo: dict) -> LabelHead:
        """A copy with its own offset, scoring with the same model (a copy of the model would escape training)."""
        new = LabelHead(self.target_ids, memo.get(id(self._scorer), self._scorer))  # a copied model's heads: its own
        memo[id(self)] = new
        new.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return new

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._scorer.candidate_scores(features.long(), self.target_ids) + self.bias


class LanguageModel(CLModel):
    """A ``CLModel`` around a :class:`TextBackbone`; the loop tells it from an image model by ``generative``
    (its own training loss and predictions). ``features(x)`` is the token rows themselves (a text's
    representation is the whole model's pass, which a head's scoring runs); no image preprocessing."""

    generative = True

    def __init__(self, backbone: TextBackbone, tokenizer: Any, eval_mode: str = "generate",
                 max_source_length: int = 512, max_target_length: int = 50) -> None:
        super().__init__(backbone, 0, 0, [0.0], [1.0])  # image_size 0: no image path (resize, augmentation)
        self.tokenizer = tokenizer
        self.eval_mode, self.max_source_length, self.max_target_length = eval_mode, max_source_length, max_target_length

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features

    # -- data -------------------------------------------------------------------------------------------
    def encode(self, stream: Any) -> Stream:
        """A ``clbench.data.text.TextStream`` as the loop's ``Stream`` of packed token rows (module docstring)."""
        tok = self.tokenizer
        prompts, targets = [], []
        for task in stream.tasks:
            if not task.labels:
                raise ClbenchError(f"stream {stream.name}: task {task.name} has no label words")
            rows = [tok.encode(lab)[: self.max_target_length - 1] + [tok.eos_id] for lab in task.labels]
            targets.append(rows)
            prompts.append([[self.prompt_ids(e.text) for e in part]
                            for part in (task.train, task.test)])
        L = max((len(p) for parts in prompts for part in parts for p in part), default=1)
        T = max(len(r) for rows in targets for r in rows)
        self.backbone.source_len = L
        left = self.backbone.family != "t5"  # a causal LM's prompt ends where its answer starts
        pad = tok.pad_id

        def row(ids: list[int], n: int, left_pad: bool) -> list[int]:
            return [pad] * (n - len(ids)) + ids if left_pad else ids + [pad] * (n - len(ids))

        tasks, offset = [], 0
        for task, rows, (train_p, test_p) in zip(stream.tasks, targets, prompts, strict=True):
            target_ids = torch.tensor([row(r, T, False) for r in rows], dtype=torch.long)
            C = len(task.labels)

            def pack(part, ps, gold):  # noqa: ANN001
                x = torch.full((len(ps), L + T), pad, dtype=torch.long)
                for i, (e, p) in enumerate(zip(part, ps, strict=True)):
                    x[i, :L] = torch.tensor(row(p, L, left), dtype=torch.long)
                    if gold:
                        x[i, L:] = target_ids[e.label]  # noqa: B023
                y = torch.tensor([offset + e.label for e in part], dtype=torch.long)  # noqa: B023
                return x, y

            (trx, try_), (tex, tey) = pack(task.train, train_p, True), pack(task.test, test_p, False)
            tasks.append(TextTaskData(tuple(range(offset, offset + C)), trx, try_, tex, tey,
                                      labels=tuple(task.labels), target_ids=target_ids))
            offset += C
        meta = {**stream.meta, "prompt_tokens": str(L), "target_tokens": str(T)}
        return Stream(stream.name, tasks, list(range(offset)), meta)

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's tokens as O-LoRA's collator makes them (the tokenizer's special tokens, cut to
        ``max_source_length`` with them kept): a T5's end with end of sequence, a causal LM's start with its
        tokenizer's beginning of sequence when it has one."""
        tok, n = self.tokenizer, self.max_source_length
        ids = tok.encode(text)
        if self.backbone.family == "t5":
            return ids[: n - 1] + [tok.eos_id]
        bos = getattr(tok, "bos_id", None)
        return ids[:n] if bos is None else [bos] + ids[: n - 1]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # -- heads --------------------------------------------------------------------------------------------
    def add_task_head(self, task: TextTaskData) -> LabelHead:
        head = LabelHead(task.target_ids.to(self.mean.device), self)
        self.heads.append(head.to(self.mean.device))
        return head

    def add_head(self, num_classes: int) -> nn.Module:
        raise ClbenchError("a language model's head is built from its task's label words (add_task_head(task))")

    # -- the passes ---------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def train_loss(self, x: torch.Tensor, y: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """O-LoRA's training loss: teacher-forced cross-entropy on the target tokens (mean over the tokens of the
        batch, padding not scored); also the token logits (N x T x vocabulary) and no aux."""
        target = self.heads[head].target_ids[y]
        logits = self.backbone(x[:, : self.backbone.source_len], target)
        labels = target.masked_fill(target == self.backbone.pad_id, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss, logits, {}

    def candidate_scores(self, x: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Summed log-likelihood of every candidate target (C x T) after each row's prompt: N x C."""
        prompt = x[:, : self.backbone.source_len]
        valid = target_ids != self.backbone.pad_id
        encoded = self.backbone.encode(prompt)
        scores = []
        for c in range(len(target_ids)):
            target = target_ids[c].expand(len(prompt), -1)
            logp = self.backbone(prompt, target, encoded).float().log_softmax(-1)
            tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            scores.append((tok * valid[c]).sum(1))
        return torch.stack(scores, 1)

    def forward(self, x: torch.Tensor, head: int | None = None, with_aux: bool = False):
        """Candidate scores of ``head``'s label words (or of every head's, concatenated)."""
        heads = [self.heads[head]] if head is not None else list(self.heads)
        scores = torch.cat([h(x) for h in heads], -1)
        return (scores, {}) if with_aux else scores

    @torch.no_grad()
    def generate(self, x: torch.Tensor, max_tokens: int | None = None, kv_cache: bool = True) -> list[str]:
        """Greedy decoding of at most ``max_tokens`` (default: the stream's target length) tokens per row, stopped
        at end of sequence; the decoded texts. With ``kv_cache`` each step runs only the token chosen before
        (``TextBackbone.next_logits``); without it each step reruns every token so far (``TextBackbone.forward``),
        the reference ``tests/test_lm.py`` holds the cached decoding's choices to."""
        prompt = x[:, : self.backbone.source_len]
        steps = max_tokens or (x.shape[1] - self.backbone.source_len) or self.max_target_length
        pad, eos = self.backbone.pad_id, self.tokenizer.eos_id
        out = torch.full((len(prompt), steps), pad, dtype=torch.long, device=prompt.device)
        done = torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
        encoded = self.backbone.encode(prompt)
        cache: dict[str, Any] = {}
        for s in range(steps):
            if kv_cache:
                nxt = self.backbone.next_logits(prompt, out[:, s - 1: s] if s else None, encoded, cache).argmax(-1)
            else:
                nxt = self.backbone(prompt, out[:, : s + 1], encoded)[:, s].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, s] = nxt
            done |= nxt == eos
            if bool(done.all()):
                break
        texts = []
        for ids in out.tolist():
            ids = ids[: ids.index(eos)] if eos in ids else ids
            texts.append(self.tokenizer.decode([i for i in ids if i != pad]))
        return texts

    def predict(self, x: torch.Tensor, n_seen: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class- and task-incremental predictions (global class ids; -1: no label word) as ``eval_mode`` says."""
        if self.eval_mode == "likelihood":
            scores = self(x)[:, :n_seen]
            return scores.argmax(1), scores[:, lo:hi].argmax(1) + lo
        words: dict[str, int] = {}
        for j, h in enumerate(self.heads):
            for c, ids in enumerate(h.target_ids.tolist()):
                cls = int(sum(len(self.heads[k].target_ids) for k in range(j))) + c
                if cls < n_seen:
                    text = self.tokenizer.decode([i for i in ids if i not in (self.backbone.pad_id,
                                                                               self.tokenizer.eos_id)])
                    words.setdefault(normalize_answer(text), cls)
        pred = torch.tensor([words.get(normalize_answer(t), -1) for t in self.generate(x)], device=x.device)
        return pred, pred


def language_skeleton(name: str) -> TextBackbone | None:
    """The backbone's modules as the current default device builds them (the preflight: the meta device, no
    weights): a tiny one from its config, a hub model from its cached config (None when the config is not cached:
    the backbone check reports that)."""
    if name in LM_TINY:
        from clbench.data.lm_synthetic import VOCABULARY

        tok = WordTokenizer(VOCABULARY)
        hf, family = _tiny_hf(name, len(tok), tok.pad_id, tok.eos_id)
        return TextBackbone(hf, family, tok.pad_id)
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    hub_id = name[len(HF_PREFIX):]
    if not (Path(hub_id) / "config.json").is_file() and not isinstance(
            try_to_load_from_cache(hub_id, "config.json"), str):
        return None
    tf = require_transformers(name)
    config = tf.AutoConfig.from_pretrained(hub_id)
    if getattr(config, "is_encoder_decoder", False):
        return TextBackbone(tf.AutoModelForSeq2SeqLM.from_config(config), "t5", 0)
    return TextBackbone(tf.AutoModelForCausalLM.from_config(config), "causal", 0)


def build_language_model(name: str, pretrained: bool = False, eval_mode: str = "generate",
                         max_source_length: int = 512, max_target_length: int = 50) -> LanguageModel:
    """The language model a suite's backbone names (module docstring); random weights for the tiny ones."""
    if name in LM_TINY:
        from clbench.data.lm_synthetic import VOCABULARY

        if pretrained:
            raise ClbenchError(f"backbone.pretrained: {name} has no pretrained weights (it is built from a config "
                               "with random weights from the run's seed); set backbone.pretrained: false")
        tok: Any = WordTokenizer(VOCABULARY)
        hf, family = _tiny_hf(name, len(tok), tok.pad_id, tok.eos_id)
    elif name.startswith(HF_PREFIX):
        hf, raw, family = _hub_hf(name, pretrained)
        tok = HubTokenizer(raw)
    else:
        raise ClbenchError(f"backbone.name: '{name}' is no language backbone; use {sorted(LM_TINY)} or hf:<hub id>")
    backbone = TextBackbone(hf, family, tok.pad_id)
    return LanguageModel(backbone, tok, eval_mode, max_source_length, max_target_length)


def model_for(bb: Any) -> CLModel:
    """The model a suite's ``backbone`` section describes: a language model for a language backbone's name, else
    the image model (``clbench.model.backbones.model_from``)."""
    if is_language_backbone(bb.name):
        return build_language_model(bb.name, bb.pretrained, bb.lm_eval, bb.max_source_length, bb.max_target_length)
    return model_from(bb)

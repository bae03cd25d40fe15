"""Greedy decoding of a language model with the kept keys and values against rerunning every token (issue 39's
follow-up): ``clbench.model.lm.LanguageModel.generate`` with ``kv_cache=True`` (each step runs the token chosen
before on the model's kept keys and values, ``TextBackbone.next_logits``) and with ``kv_cache=False`` (each step
reruns the prompt, for a causal LM, and every token generated so far through ``TextBackbone.forward``).

For each tiny backbone (``t5_tiny_clbench``, ``llama_tiny_clbench``: random weights from the seed, 2 blocks,
width 64) and each decoding length, the same batch of the language quickstart's test prompts is decoded both ways,
the two orders alternating every repeat; the clock is process CPU time of one torch thread (the machine is shared).
EOS does not stop the timed decoding early: the end-of-sequence token is never chosen (its logit is set to -inf), so
both ways run every step and the ratio compares equal work. Printed as ``name=value`` lines:

- ``decode_ratio/<backbone>/tokens<N>``: the median over repeats of (seconds without the cache) / (seconds with it);
- ``decode_ms/<backbone>/tokens<N>/{cached,rerun}``: the medians, milliseconds per batch;
- ``same_texts/<backbone>/tokens<N>``: 1 when both ways decoded the same texts (checked on every repeat).

Usage: python benchmarks/lm_decoding.py [--tokens 4,16,32] [--batch 64] [--repeats 5] [--threads 1]
Not part of the test suite: timings only (tests/test_lm.py holds the two ways' choices equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clbench.testing import model_and_stream, tiny_text_case  # noqa: E402


def timed_generate(model, x: torch.Tensor, tokens: int, kv_cache: bool) -> tuple[float, list[str]]:  # noqa: ANN001
    tic = time.process_time()
    texts = model.generate(x, max_tokens=tokens, kv_cache=kv_cache)
    return time.process_time() - tic, texts


def never_eos(eos: int):  # noqa: ANN201
    """A forward hook that makes the end-of-sequence token unchoosable (in place; the output stays the model's)."""

    def hook(_module, _inputs, out) -> None:  # noqa: ANN001
        out.logits[..., eos] = float("-inf")

    return hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4,16,32", help="decoding lengths, comma-separated")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbones", default="t5_tiny_clbench,llama_tiny_clbench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average: {os.getloadavg()[0]:.2f}; torch threads: {args.threads}; clock: process CPU time")
    lines = []
    for name in args.backbones.split(","):
        model, stream = model_and_stream(tiny_text_case(2, name, per_class=2 * -(-args.batch // 6) + 2))
        model.eval()
        x = torch.cat([task.test_x for task in stream.tasks])[: args.batch]
        # equal work both ways: the end-of-sequence token is never chosen, so no row stops early
        hook = model.backbone.hf.register_forward_hook(never_eos(model.tokenizer.eos_id))
        for tokens in (int(t) for t in args.tokens.split(",")):
            cached, rerun, same = [], [], True
            with torch.no_grad():
                for r in range(args.repeats):
                    order = (True, False) if r % 2 == 0 else (False, True)
                    texts = {}
                    for kv in order:
                        seconds, texts[kv] = timed_generate(model, x, tokens, kv)
                        (cached if kv else rerun).append(seconds)
                    same &= texts[True] == texts[False]
            ratio = statistics.median(b / a for a, b in zip(cached, rerun))
            key = f"{name}/tokens{tokens}"
            lines += [f"decode_ratio/{key}={ratio:.2f}",
                      f"decode_ms/{key}/cached={1e3 * statistics.median(cached):.1f}",
                      f"decode_ms/{key}/rerun={1e3 * statistics.median(rerun):.1f}",
                      f"same_texts/{key}={int(same)}"]
        hook.remove()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""One-call GPU performance check (issue 11, item 3); run through ``benchmarks/gpu_check.sh``.

ViT-B/16 at 224 px with random weights (timm ``vit_base_patch16_224``, ``pretrained=False``: no network) on a
synthetic stream of random uint8 images, two tasks of 10 classes. Every method (default: lora, inflora, olora,
eblora, plus ``bare``: a plain PyTorch loop over the same model and LoRA adapters) runs in its own
subprocess under a hard time limit (``--budget`` seconds), through clbench's real loop and the method's hooks
(``clbench.run.loop.run_stream``, bf16 autocast, pinned host memory). Task 0 is the warm-up (cuBLAS heuristics,
allocator, compilation with ``--compile``); figures come from task 1:

* ``train_img_per_s``: task 1's training images / the loop's ``train_seconds`` (forward, loss terms, backward,
  gradient hooks, optimizer step, host-to-device copies; the loop synchronises at the end of the task);
* ``eval_img_per_s``: images of both tasks' test sets / task 1's ``eval_seconds`` (CIL + TIL evaluation);
* ``mfu_train``, ``mfu_eval``: analytic model FLOPs per image (see ``vit_flops``) x img/s / ``--peak-tflops``
  (790 TFLOP/s: an H200's measured bf16 dense matrix rate);
* ``peak_mem_gib``: ``torch.cuda.max_memory_allocated`` over task 1 (training and evaluation);
* ``hook_seconds``: task 1's task-level hooks (before_task, after_task, merge_task);
* ``hook_syncs_per_step``: host-device synchronisations inside the per-step hooks (loss_terms,
  before_optimizer_step, after_optimizer_step), counted with ``torch.cuda.set_sync_debug_mode("warn")``
  switched on only while those hooks run.

Targets (one H200, issue 11): lora training >= 5,000 img/s, evaluation >= 12,000 img/s.
Exit codes: 0 done (targets are reported, not enforced), 1 unknown method, 2 CUDA missing, 3 clbench not
importable.
``--smoke`` runs the same code path on the CPU with ``vit_micro_clbench`` at 16 px in seconds (a test of the
script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = "bare,lora,inflora,olora,eblora"
RESULT = "GPU_CHECK_RESULT "


def vit_flops(depth: int, dim: int, hidden: int, tokens: int, patches: int, patch_dim: int) -> tuple[float, float]:
    """(forward, activation-gradient backward) model FLOPs per image of a ViT (2 FLOPs per multiply-add).

    Forward: per block and token the qkv, proj, fc1 and fc2 GEMMs (4 d^2 + 2 d h MACs) and attention's QK^T and
    AV (2 N d MACs), plus the patch embedding (patches x patch_dim x d MACs). Backward with a frozen backbone
    (LoRA): only the activation gradients, dX = dY W^T for every linear map (the same MACs as forward; no
    weight-gradient GEMMs, no patch-embedding gradient) and both operands' gradients of QK^T and AV (twice the
    forward attention MACs). Norms, softmax, GELU, the LoRA branches (rank 10: < 0.5 %) and the heads are
    left out; so is flash attention's recomputation (hardware FLOPs, not model FLOPs).
    """
    linear = 4 * dim * dim + 2 * dim * hidden
    attn = 2 * tokens * dim
    fwd = 2 * (tokens * depth * (linear + attn) + patches * patch_dim * dim)
    bwd = 2 * (tokens * depth * linear) + 2 * 2 * (tokens * depth * attn)
    return float(fwd), float(bwd)


def model_flops(model) -> tuple[float, float]:
    bb = model.backbone
    pe = bb.patch_embed
    patches = pe.num_patches
    patch_dim = pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1]
    tokens = patches + getattr(bb, "num_prefix_tokens", 1)
    blk = bb.blocks[0]
    return vit_flops(len(bb.blocks), bb.embed_dim, blk.mlp.fc1.out_features, tokens, patches, patch_dim)


# -- child: one method ---------------------------------------------------------------------------------------------

def run_child(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from overhead import bare_eval, bare_train, method_classes, synthetic_stream  # noqa: E402

    from clbench.methods.registry import run_manager
    from clbench.model.backbones import build_model
    from clbench.run.loop import LoopOptions, autocast_for, run_stream
    from clbench.suite import RuntimeConfig, TrainConfig

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(args.model, args.image_size, pretrained=False, checkpoint=None)
    fwd, bwd = model_flops(model)
    bs, steps, warm = args.batch_size, args.steps, args.warmup_steps
    stream = synthetic_stream(2, 10, [bs * warm, bs * steps], args.test_per_task, model.in_chans, args.image_size)
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=1e-3, optimizer="adam", precision="auto")
    runtime = RuntimeConfig(device=str(device), compile=args.compile, log_every=args.log_every,
                            eval_batch_size=args.eval_batch_size)
    autocast = autocast_for(device, cfg.precision)
    out: dict = {"method": args.child, "flops_fwd": fwd, "flops_bwd_act": bwd}
    from timm.layers import use_fused_attn

    out["fused_attn"] = bool(use_fused_attn()) and all(getattr(b.attn, "fused_attn", False)
                                                        for b in model.backbone.blocks)

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    if args.child == "bare":
        lora = method_classes(["lora"])["lora"]
        # a plain loop over the same model and LoRA adapters (warm-up, then timed), then a plain evaluation
        import copy
        trained = copy.deepcopy(model)
        lora().configure_model(model=trained, ctx=None)
        t0 = stream.tasks[0]
        bare_train(copy.deepcopy(trained), t0.train_x, t0.train_y, bs, warm, device, autocast)
        reset_peak()
        t1 = stream.tasks[1]
        secs, n = bare_train(trained, t1.train_x, t1.train_y, bs, steps, device, autocast)
        out["train_img_per_s"] = n / secs
        plain = model.to(device)
        for t in stream.tasks:
            plain.add_head(len(t.classes))
        bare_eval(plain.backbone, plain.heads, plain.preprocess, stream, args.eval_batch_size, device, autocast)
        secs, n = bare_eval(plain.backbone, plain.heads, plain.preprocess, stream, args.eval_batch_size, device,
                            autocast)
        out["eval_img_per_s"] = n / secs
        out["peak_mem_gib"] = peak_gib()
        return out

    method = method_classes([args.child])[args.child]()
    pm = run_manager(method)
    per_step = {"loss_terms", "before_optimizer_step", "after_optimizer_step"}
    syncs = {"count": 0, "steps": 0}
    import warnings

    recorded: list = []

    def before(hook_name, impls, kwargs):
        if device.type == "cuda" and hook_name in per_step:
            torch.cuda.set_sync_debug_mode("warn")

    def after(outcome, hook_name, impls, kwargs):
        if device.type == "cuda" and hook_name in per_step:
            torch.cuda.set_sync_debug_mode("default")
        if hook_name == "after_optimizer_step":
            syncs["steps"] += 1

    pm.add_hookcall_monitoring(before, after)
    results = []

    def on_task(res, state, model) -> None:
        results.append(res)
        if res.task == 0:
            recorded.clear()
            syncs["steps"] = 0
            reset_peak()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded = caught
        run_stream(model, stream, pm, cfg, 0, LoopOptions(device=device, on_task=on_task, runtime=runtime))
        n_sync = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    r = results[-1]
    out["train_img_per_s"] = r.images / r.train_seconds
    out["eval_img_per_s"] = sum(len(t.test_y) for t in stream.tasks) / r.eval_seconds
    out["peak_mem_gib"] = peak_gib()
    out["hook_seconds"] = sum(r.hook_seconds.values())
    out["hook_syncs_per_step"] = n_sync / max(1, syncs["steps"])
    out["final_loss"] = r.loss
    return out


# -- parent: every method in its own process -----------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, vit_micro_clbench at 16 px, a few steps")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--model", default=None, help="timm name (default vit_base_patch16_224)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default 256)")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default 1024")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (task 1; default 40)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (task 0; default 10)")
    ap.add_argument("--test-per-task", type=int, default=None, help="test images per task (default 4096)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="runtime.compile: torch.compile the backbone")
    ap.add_argument("--budget", type=float, default=85.0, help="hard seconds per method (its subprocess)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense rate for MFU (H200: 790)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    small = dict(model="vit_micro_clbench", image_size=16, batch_size=16, eval_batch_size=64, steps=3,
                 warmup_steps=2, test_per_task=32)
    full = dict(model="vit_base_patch16_224", image_size=224, batch_size=256, eval_batch_size=1024, steps=40,
                warmup_steps=10, test_per_task=4096)
    for k, v in (small if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    if args.child:
        print(RESULT + json.dumps(run_child(args)), flush=True)
        return 0

    try:
        import clbench_plugins  # noqa: F401
        import torch

        import clbench  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: cannot import clbench ({exc}); install the repository first: pip install -e .")
        return 3
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}); run it on a machine with an NVIDIA GPU, "
              "or pass --smoke for the CPU code-path test")
        return 2
    from clbench.errors import ClbenchError
    from clbench.methods.registry import discover

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    registry = discover()
    try:
        for name in names:
            if name != "bare":
                registry.get(name)
    except ClbenchError as exc:
        print(f"gpu_check: --methods: {exc}")
        return 1
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    fwd, bwd = vit_flops(12, 768, 3072, 197, 196, 768)
    print(f"gpu_check: {device}; torch {torch.__version__}; {args.model} at {args.image_size} px; "
          f"batch {args.batch_size} (eval {args.eval_batch_size}); {args.steps} timed steps; "
          f"budget {args.budget:.0f} s per method; compile={args.compile}", flush=True)
    print(f"ViT-B/16 at 224 analytic: forward {fwd / 1e9:.2f} GFLOP/img, activation-gradient backward "
          f"{bwd / 1e9:.2f}; ceilings at {args.peak_tflops:.0f} TFLOP/s: training "
          f"{args.peak_tflops * 1e12 / (fwd + bwd):.0f} img/s, evaluation {args.peak_tflops * 1e12 / fwd:.0f} img/s",
          flush=True)
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("model", "image_size", "batch_size", "eval_batch_size", "steps", "warmup_steps",
                    "test_per_task", "log_every", "peak_tflops")]
    passthrough += ["--smoke"] * args.smoke + ["--compile"] * args.compile
    rows: dict[str, dict] = {}
    for name in names:
        tic = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, *passthrough]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget, env=os.environ.copy())
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT)), None)
            if proc.returncode != 0 or line is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rows[name] = {"status": f"error (exit {proc.returncode}): {tail[0][:200]}"}
            else:
                rows[name] = {"status": "ok", **json.loads(line[len(RESULT):])}
        except subprocess.TimeoutExpired:
            rows[name] = {"status": f"timeout after {args.budget:.0f} s"}
        rows[name]["wall_s"] = time.perf_counter() - tic
        row = rows[name]
        if row["status"] == "ok":
            f_train = row["flops_fwd"] + row["flops_bwd_act"]
            row["mfu_train"] = row["train_img_per_s"] * f_train / (args.peak_tflops * 1e12)
            row["mfu_eval"] = row["eval_img_per_s"] * row["flops_fwd"] / (args.peak_tflops * 1e12)
            print(f"{name:8s} train {row['train_img_per_s']:9.0f} img/s (MFU {100 * row['mfu_train']:5.1f} %)  "
                  f"eval {row['eval_img_per_s']:9.0f} img/s (MFU {100 * row['mfu_eval']:5.1f} %)  "
                  f"peak {row['peak_mem_gib']:6.2f} GiB  [{row['wall_s']:.0f} s]", flush=True)
        else:
            print(f"{name:8s} {row['status']}  [{row['wall_s']:.0f} s]", flush=True)

    print(f"device={device}")
    print(f"model={args.model}")
    for name, row in rows.items():
        print(f"status/{name}={row['status']}")
        for key in ("train_img_per_s", "eval_img_per_s", "mfu_train", "mfu_eval", "peak_mem_gib", "hook_seconds",
                    "hook_syncs_per_step", "fused_attn", "wall_s"):
            if key in row:
                v = row[key]
                print(f"{key}/{name}={v:.4f}" if isinstance(v, float) else f"{key}/{name}={v}")
    if rows.get("bare", {}).get("status") == "ok" and rows.get("lora", {}).get("status") == "ok":
        print(f"overhead_ratio={rows['bare']['train_img_per_s'] / rows['lora']['train_img_per_s']:.4f}")
    lora = rows.get("lora", {})
    if lora.get("status") == "ok" and not args.smoke:
        print(f"target/lora_train_5000={int(lora['train_img_per_s'] >= 5000)}")
        print(f"target/lora_eval_12000={int(lora['eval_img_per_s'] >= 12000)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every MLflow tag and metric key clbench writes or reads, in one place (docs/ARCHITECTURE.md section 4 lists them, generated from this file).

Writers (``clbench.run.recorder``, ``clbench.run.runner``, ``clbench.analysis.metrics``) and readers (``clbench.store.tracking``,
``clbench.analysis.leaderboard``, ``clbench.analysis.report``, ``clbench.cli``) import these names, so a renamed key cannot drift
between the run that logs it and the leaderboard that reads it. Layout: one parent run per suite invocation
(``suite/*``), one child run per (method, seed): per-task metrics at step = task index (``eval/*``,
``train/*``, ``cost/task_*``, the per-layer ``spectra/*`` of ``clbench.model.spectra``), final metrics at the last
step (``final/*``, ``cost/*``, ``spectra/mean_*``). A run on the validation split (``clbench sweep``) logs its
``eval/*`` and ``final/*`` under ``val/`` (``for_split``) and is tagged ``clbench.split=validation``; readers of test
results never see it (``clbench.store.tracking.read_runs``).
"""

from __future__ import annotations

# -- tags -------------------------------------------------------------------------------------------------------
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag
ROLE = "clbench.role"
ROLE_PARENT = "parent"
ROLE_CHILD = "child"
SUITE = "clbench.suite"
SUITE_HASH = "clbench.suite_hash"  # the protocol: runs of different hashes are never compared
WEIGHTS = "clbench.weights_sha256"  # the backbone's starting weights (clbench.weights), inside the suite hash
VERSION = "clbench.version"
GIT_SHA = "clbench.git_sha"
METHOD = "clbench.method"  # the suite's label of the method entry
METHOD_NAME = "clbench.method_name"  # the registered method name
SEED = "clbench.seed"
DEVICE = "clbench.device"
PRECISION = "clbench.precision"  # the arithmetic that ran (train.precision: auto resolved on the device)
RUNTIME_PREFIX = "clbench.runtime."  # + a runtime setting (device, compile, log_every, ...): not in the hash
PLUGIN_SOURCE = "clbench.plugin_source"
CODE_DIGEST = "clbench.code_digest"  # the method's source digest (clbench.registry.code_identity): part of resume
LOW_RANK_UPDATES = "clbench.low_rank_updates"  # "false": the method has no low-rank update (spectra n/a)
STREAM_PREFIX = "clbench.stream."  # + a stream's meta key (split_sha256, ...)
ERROR = "clbench.error"
REFERENCE = "clbench.reference"  # a reproduction suite's reference: block (JSON list), read by the leaderboard
SPLIT = "clbench.split"  # "validation" on runs evaluated on held-out training data (absent: the test split)
SPLIT_TEST = "test"
SPLIT_VALIDATION = "validation"
SWEEP = "clbench.sweep"  # the sweep id (clbench.sweep): on the sweep parent, its trials and a --then-test run
SWEEP_RUN = "clbench.sweep_run"  # a tuned run: the MLflow run id of the sweep parent its values came from
SEARCH_SPACE = "clbench.search_space"  # the sweep's search space, as typed (--grid flags and --random N)
SWEEP_METRIC = "clbench.sweep_metric"  # the validation metric the sweep ranked its points by
TRIAL = "clbench.trial"  # a sweep trial's point: KEY=VALUE pairs
SWEEP_BEST = "clbench.sweep_best"  # on the sweep parent: the best point's KEY=VALUE pairs
TUNED = "clbench.tuned"  # "true": the method entry's values were chosen by a sweep on the validation split

# -- per task (step = task index) -------------------------------------------------------------------------------
EVAL_ACC = "eval/acc"  # A_t: CIL accuracy over the pooled test samples of tasks 0..t
EVAL_ACC_TIL = "eval/acc_til"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"  # the adapter group's lr, once per epoch at step = task * epochs + epoch
TASK_TRAIN_SECONDS = "cost/task_train_seconds"
TASK_EVAL_SECONDS = "cost/task_eval_seconds"
SPECTRA_SECONDS = "cost/spectra_seconds"
SPECTRA_TOP1 = "spectra/top1_share"  # this task's update (clbench.model.spectra writes the spectra/* row)
SPECTRA_OVERLAP = "spectra/overlap"


VAL_PREFIX = "val/"  # a validation run's accuracy metrics: eval/* and final/* renamed (clbench.data.validation)


def for_split(key: str, split: str) -> str:
    """The key a run on ``split`` logs for ``key``: a validation run measures no test image, so its ``eval/*``
    and ``final/*`` (both test-split metrics) go under ``val/`` (``eval/acc`` -> ``val/acc``, ``final/forgetting``
    -> ``val/forgetting``, ``eval/acc/task_03`` -> ``val/acc/task_03``); every other key, and every key of a test
    run, is unchanged. ``eval/acc`` after the last task and ``final/acc`` are one number, so they share
    ``val/acc``."""
    if split == SPLIT_VALIDATION:
        for prefix in ("eval/", "final/"):
            if key.startswith(prefix):
                return VAL_PREFIX + key.removeprefix(prefix)
    return key


def eval_acc_task(j: int) -> str:
    """CIL accuracy on task j's test set after the current task (a row of the accuracy matrix)."""
    return f"eval/acc/task_{j:02d}"


def train_term(name: str) -> str:
    """A method's extra loss term, mean over the task's steps."""
    return f"train/{name}"


def runtime_tag(name: str) -> str:
    """The tag recording runtime setting ``name`` (suite ``runtime:``, outside the suite hash)."""
    return RUNTIME_PREFIX + name


def hook_seconds(hook: str) -> str:
    return f"cost/hook_seconds/{hook}"


# -- final (child run, step = last task) ------------------------------------------------------------------------
FINAL_ACC = "final/acc"
FINAL_AVG_ACC = "final/avg_acc"
FINAL_FORGETTING = "final/forgetting"
FINAL_BWT = "final/bwt"
FINAL_ACC_TIL = "final/acc_til"
COST_TRAIN_SECONDS = "cost/train_seconds"
COST_IMG_PER_S = "cost/img_per_s"
COST_PEAK_MEM_MB = "cost/peak_mem_mb"
COST_TRAINABLE_PARAMS = "cost/trainable_params"
COST_HOOK_SHARE = "cost/hook_share"
COST_BUFFER_IMAGES = "cost/buffer_images"  # rehearsal: images the method keeps (per task, and the last as final)
# the method's own work outside the step loop: its task-level hooks (before_task, after_task, merge_task,
# task_updates, replay_buffer, method_state), summed over tasks; a closed-form method's whole training
COST_METHOD_SECONDS = "cost/method_seconds"
COST_TOTAL_SECONDS = "cost/total_seconds"  # cost/train_seconds + cost/method_seconds: the leaderboard's time
COST_STATE_MB = "cost/state_mb"  # size of the tensors in method_state (per task, and the last as final)
COST_CHECKPOINT_MB = "cost/checkpoint_mb"  # size of the run's checkpoint file after the task (per task, last as final)
SPECTRA_MEAN_TOP1 = "spectra/mean_top1_share"  # mean over tasks of spectra/top1_share
SPECTRA_MEAN_OVERLAP = "spectra/mean_overlap"  # mean over tasks of spectra/overlap

# -- suite (parent run) ------------------------------------------------------------------------------------------
SUITE_RUNS_FINISHED = "suite/runs_finished"
SUITE_RUNS_FAILED = "suite/runs_failed"
SUITE_SPEARMAN = "suite/spearman_imbalance_forgetting"
SUITE_SPEARMAN_P = "suite/spearman_p"
SUITE_SPEARMAN_N = "suite/spearman_n"
SUITE_SPECTRA_EXCLUDED = "suite/spectra_excluded_runs"  # finished runs the spectra statistics leave out
SPECTRA_EXCLUDED = "clbench.spectra_excluded"  # parent-run tag: how many runs were left out and why

# -- claim suite (parent run; clbench.analysis.claim) ---------------------------------------------------------------------
CLAIM_REFERENCE = "keep"  # the label of the claim suite's reference entry (plain IncLoRA)


def claim_key(label: str, metric: str, stat: str) -> str:
    """``claim/<label>/<metric>_diff`` (stat ``diff``) or ``claim/<label>/<metric>_diff_<stat>`` (``ci95``, ``p``,
    ``n``): metric forgetting | acc, the arm minus ``keep`` paired by seed (clbench.analysis.claim)."""
    return f"claim/{label}/{metric}_diff" + ("" if stat == "diff" else f"_{stat}")

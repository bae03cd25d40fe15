"""The MLflow UI's view of a clbench experiment: the runs table as the leaderboard.

MLflow 3 opens an experiment according to its ``mlflow.experimentKind`` tag (GenAI experiments land on traces)
and restores a runs-table view from a *saved view*: an experiment tag ``mlflow.sharedViewState.<id>`` holding a
JSON envelope ``{name, createdAt, updatedAt, state}`` whose ``state`` is the JSON of the page's search facets
(``orderByKey``, ``orderByAsc``, ``searchFilter``, ...) and UI state (``selectedColumns``, ...); the URL
``#/experiments/<id>/runs?viewStateShareKey=<id>`` opens it, and the view is listed among the experiment's saved
views. (Read from MLflow 3.x's UI bundle: ``mlflow/server/js``, the shared-view-state hook.) Sorting by a metric
also un-nests child runs, so every (method, seed) is a row of its own.

Which experience the UI shows is not the experiment's kind tag: MLflow 3.17's UI derives an experiment's kind from
its *global* workflow type (``useExperimentKind``: a feature flag that is always on returns the kind of the
workflow type and ignores ``mlflow.experimentKind``), which is the URL's ``workflowType`` parameter, else the
browser's localStorage ``mlflow.workflowType_v1`` (JSON), else ``genai``. A fresh browser therefore opens the base
URL, every experiment link and every run in GenAI mode (traces overview, "Evaluations"). ``clbench ui`` serves
MLflow's own app with one change (:mod:`clbench.store.uiserver`): the page sets that localStorage key to
``machine_learning`` when the browser has none, so every way in lands on the model-training runs table; a user
who switches to GenAI keeps the choice. The kind tag is still set for MLflow versions that read it.
"""

from __future__ import annotations

import json
import time

from clbench import keys

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # the runs table, not the GenAI traces overview
VIEW_ID = "clbench-leaderboard"
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"  # the UI's useLocalStorage key (name + "_v" + version), JSON value
WORKFLOW = "machine_learning"
# The runs the leaderboard averages: finished child runs of the test protocol. Validation (sweep) trials log val/*
# instead of final/*, and parents have no clbench.role = child, so both fall out; so do failed and running runs.
# (A seed run twice stays twice here; the leaderboard keeps the latest.)
SEARCH_FILTER = ("tags.`clbench.role` = 'child' and attributes.status = 'FINISHED' and metrics.`final/acc` >= 0")
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
# The leaderboard's columns: the headline metrics and the spectral summary (mean top-1 share of the updates).
COLUMNS = (keys.FINAL_ACC, keys.FINAL_FORGETTING, keys.FINAL_AVG_ACC, keys.SPECTRA_MEAN_TOP1)
SORT_KEY = keys.FINAL_ACC


def column_key(kind: str, key: str) -> str:
    """MLflow UI's canonical column id: ``metrics.`final/acc```, ``tags.`clbench.method```."""
    return f"{kind}.`{key}`"


def view_state() -> dict:
    """Search facets and UI state of the leaderboard view: sorted by final/acc (best first), metric columns shown,
    every run visible in the charts."""
    return {
        "orderByKey": column_key("metrics", SORT_KEY),
        "orderByAsc": False,
        "searchFilter": SEARCH_FILTER,
        "selectedColumns": [column_key("tags", "clbench.method"), column_key("tags", "clbench.seed")]
        + [column_key("metrics", k) for k in COLUMNS] + [column_key("tags", "clbench.suite_hash")],
        "runsHiddenMode": "SHOW_ALL",
    }


def view_tag_value(now_ms: int | None = None) -> str:
    """The saved-view envelope MLflow's UI reads from the ``VIEW_TAG`` experiment tag."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": "clbench leaderboard (sorted by final/acc)", "createdAt": now, "updatedAt": now,
                       "state": json.dumps(view_state())})


def experiment_tags() -> dict[str, str]:
    """Tags that make MLflow's UI open a clbench experiment on its leaderboard."""
    return {KIND_TAG: KIND, VIEW_TAG: view_tag_value()}


def storage_script() -> str:
    """The ``<script>`` :mod:`clbench.store.uiserver` puts first in the UI's page: the model-training workflow as the
    browser's default (kept when the browser already has a choice)."""
    key, value = json.dumps(WORKFLOW_STORAGE_KEY), json.dumps(json.dumps(WORKFLOW))
    return (f"<script>try{{if(localStorage.getItem({key})===null)localStorage.setItem({key},{value})}}"
            "catch(e){}</script>")


def view_url(base: str, experiment_id: str) -> str:
    """The UI address of an experiment's leaderboard view (``base`` like ``http://127.0.0.1:5000``)."""
    # The runs tab itself: the experiment's landing redirect keeps only a few URL parameters (not the view key).
    # workflowType overrides the UI's global GenAI / model-training switch, which otherwise wins over the
    # experiment's kind tag.
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_ID}")

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
MLflow's own app with one change (:mod:`clbench.store.uiserver`): a script first in the page (:func:`page_script`)
sets that localStorage key to ``machine_learning`` when the browser has none, so every way in lands on the
model-training runs table; a user who switches to GenAI keeps the choice. The kind tag is still set for MLflow
versions that read it.

The same script makes the leaderboard view the runs table's own state for every clbench experiment of the served
store (the state MLflow restores when an address names no sort or filter: the experiments list's link, MLflow's
"View experiment at" line, a run page's breadcrumb), also for an experiment created after the page loaded (looked up
when the page's route first names it), opens the base URL on the runs table of the suite that ran
last (instead of MLflow's GenAI getting-started home), and shows the table's metric cells rounded: MLflow 3.17 prints
logged values unrounded (``59.29666666666667``) and has no setting for it, so the script rewrites the text of the
cells it draws (two decimals; three significant digits below 1, so shares and small losses keep their digits).
The store, the charts and the run pages keep the logged values. Column widths in the view state show every header
whole, and the view fits a 1600-pixel window.
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


def column_width(key: str) -> int:
    """Pixels that show a column's whole header (its key, in the grid's 13 px font, with the sort arrow and the
    header's padding): MLflow's 100 px default cuts every clbench key longer than ``final/acc``."""
    return max(110, 7 * len(key) + 44)


def view_columns() -> list[str]:
    """The view's columns left to right (after MLflow's own run name, created and duration columns): the method,
    the leaderboard's metrics. The whole view fits a 1600-pixel window without horizontal scrolling: the run name
    (``<label>-s<seed>``) already names the seed, and the suite hash stays a tag of every run (its page's Tags, or
    the Columns menu) rather than a column 170 pixels wide that every row shares within a protocol."""
    return [column_key("tags", keys.METHOD)] + [column_key("metrics", k) for k in COLUMNS]


def view_state() -> dict:
    """Search facets and UI state of the leaderboard view: sorted by final/acc (best first), metric columns shown
    wide enough for their whole names, every run visible in the charts. (MLflow applies ``columnWidths`` only to
    the columns ``columnOrder`` lists.)"""
    columns = view_columns()
    return {
        "orderByKey": column_key("metrics", SORT_KEY),
        "orderByAsc": False,
        "searchFilter": SEARCH_FILTER,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: column_width(c.split(".", 1)[1].strip("`")) for c in columns},
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


# The leaderboard view as a browser's own state of an experiment's runs table: MLflow's runs page restores the
# facets (sort, filter) and UI state (columns, widths) it last showed from this localStorage entry (LocalStorageUtils
# "ExperimentPage" store, keyed by the JSON list of the page's experiment ids) whenever the address carries none.
PERSISTED_STATE_KEY = "MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"
SEED_MARK_KEY = "clbench.leaderboardView.{id}"  # which clbench view (and which experiment) was last written there
# MLflow 3.17 opens its assistant panel over a third of the page on a browser's first visit; marked as already done
ASSISTANT_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"

# The page script, first in the UI's <head> (before MLflow's app runs, so its history hooks and listeners come
# before the router's), in three parts:
# 1. defaults the browser has no choice for yet: model-training mode, the assistant not opened on its own;
# 2. each clbench experiment's runs table starts as the leaderboard view, once per (experiment, view version): a
#    view the user changes afterwards is theirs, and a store served later on this address with other experiments
#    under the same ids gets its own; an experiment the page does not list (created after it loaded: a suite run
#    while the tab is open) is looked up through MLflow's REST API when the route first names it (history
#    pushState/replaceState, hashchange, popstate), before MLflow's router draws its runs table; the base URL itself opens the runs table of the suite that ran last (MLflow's
#    home, a GenAI getting-started page, stays one click away in its sidebar, the experiments list in the
#    breadcrumb);
# 3. numbers in the runs table's metric cells are shown rounded (``fmt``) as the grid draws them: two decimals,
#    three significant digits below 1 (exponent form below 1e-6), and an exact tie to the even digit as Python's
#    format() rounds, so the table shows the digits the terminal leaderboard prints (JavaScript's toFixed rounds
#    5.125 up to 5.13). The store, the charts and the run pages keep the logged values.
_PAGE_JS = """(function(){try{
var S=window.localStorage,D=__DEFAULTS__,E=__SEEDS__,V=__STATE__,L=__LATEST__,K=__KEYS__,H=window.history,seen={};
Object.keys(D).forEach(function(k){if(S.getItem(k)===null)S.setItem(k,D[k])});
function seed(e){seen[e.id]=1;if(S.getItem(e.mark_key)!==e.mark){S.setItem(e.state_key,V);S.setItem(e.mark_key,e.mark)}}
E.forEach(seed);
function route(u){var m=/#\\/experiments\\/([0-9]+)(?=[\\/?]|$)/.exec(String(u||""));if(!m||seen[m[1]])return;seen[m[1]]=1;
try{var x=new XMLHttpRequest();x.open("GET",K.api+m[1],false);x.send();if(x.status!==200)return;
var ex=JSON.parse(x.responseText).experiment||{},t={};(ex.tags||[]).forEach(function(g){t[g.key]=g.value});
if(!(K.view in t))return;var c=ex.creation_time==null?"":String(ex.creation_time);
seed({id:m[1],state_key:K.state[0]+JSON.stringify([m[1]])+K.state[1],mark_key:K.mark+m[1],
mark:[K.hash,m[1],c,ex.name].join("/")})}catch(err){}}
["pushState","replaceState"].forEach(function(f){var o=H[f];H[f]=function(s,t,u){route(u);return o.apply(this,arguments)}});
function here(){route(location.href)}
window.addEventListener("hashchange",here);window.addEventListener("popstate",here);here();
if(L!==null&&/^#?\\/?$/.test(location.hash))H.replaceState(null,"","#/experiments/"+L+"/runs");
}catch(err){}
var NUM=/^-?[0-9]+(\\.[0-9]+)?(e[-+]?[0-9]+)?$/i,CELL='.ag-cell[col-id^="metrics."]';
function fmt(v){var a=Math.abs(v);if(a!==0&&a<1e-6)return v.toExponential(2);
var d=a>=1||a===0?2:2-Math.floor(Math.log10(a)),r=a.toFixed(d),x=a.toFixed(d+20),i=x.indexOf(".")+d+1;
if(/^50*$/.test(x.slice(i))&&x.charAt(i-1)%2===0)r=x.slice(0,i);
return(v<0?"-":"")+r}
function fix(t){var p=t.parentElement,s=t.data.trim();if(!p||!p.closest(CELL)||!NUM.test(s))return;
var r=fmt(Number(s));if(r!==s)t.data=r}
function scan(n){if(n.nodeType===3){fix(n);return}if(n.nodeType!==1)return;
var w=document.createTreeWalker(n,NodeFilter.SHOW_TEXT),t;while((t=w.nextNode()))fix(t)}
new MutationObserver(function(ms){ms.forEach(function(m){if(m.type==="characterData")fix(m.target);
else m.addedNodes.forEach(scan)})}).observe(document.documentElement,{childList:true,subtree:true,characterData:true});
})();"""


def view_hash() -> str:
    """12 hex digits naming this version's view state (part of every seed mark)."""
    import hashlib

    return hashlib.sha256(json.dumps(view_state(), sort_keys=True).encode()).hexdigest()[:12]


def seed_mark(experiment_id: str, name: str, creation_time: int | None) -> str:
    """Names this version's view and one experiment of one store (ids repeat across stores served on one
    address): the page rewrites an experiment's runs-table state when its mark in the browser differs. The page
    script builds the same mark from MLflow's REST answer for an experiment created after the page loaded."""
    return "/".join([view_hash(), experiment_id, "" if creation_time is None else str(creation_time), name])


def page_script(experiments: list[tuple[str, str, int | None]] = (), latest: str | None = None) -> str:
    """The ``<script>`` :mod:`clbench.store.uiserver` puts first in the UI's page, for the store's clbench
    experiments ``(id, name, creation_time)`` (those carrying the saved view); ``latest``: the id of the one whose
    run started last, where the base URL opens. An experiment created later (a suite run while the page is open)
    is looked up when the page's route first names it (MLflow's REST ``experiments/get``, read synchronously so
    that its runs-table state is in place before MLflow draws the table) and seeded the same way if it carries
    the saved view."""
    seeds = [{"id": eid, "state_key": PERSISTED_STATE_KEY.format(ids=json.dumps([eid])),
              "mark_key": SEED_MARK_KEY.format(id=eid), "mark": seed_mark(eid, name, created)}
             for eid, name, created in experiments]
    defaults = {WORKFLOW_STORAGE_KEY: json.dumps(WORKFLOW), ASSISTANT_KEY: "true"}
    state_prefix, state_suffix = PERSISTED_STATE_KEY.split("{ids}")
    lookup = {"api": "ajax-api/2.0/mlflow/experiments/get?experiment_id=", "view": VIEW_TAG,
              "state": [state_prefix, state_suffix], "mark": SEED_MARK_KEY.format(id=""), "hash": view_hash()}

    def js(value) -> str:  # JSON inside a <script>: no "</" can close it early
        return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")

    js_code = (_PAGE_JS.replace("__DEFAULTS__", js(defaults)).replace("__SEEDS__", js(seeds))
               .replace("__STATE__", js(json.dumps(view_state()))).replace("__LATEST__", js(latest))
               .replace("__KEYS__", js(lookup)))
    return f"<script>{js_code}</script>"


def view_url(base: str, experiment_id: str) -> str:
    """The UI address of an experiment's leaderboard view (``base`` like ``http://127.0.0.1:5000``)."""
    # The runs tab itself: the experiment's landing redirect keeps only a few URL parameters (not the view key).
    # workflowType overrides the UI's global GenAI / model-training switch, which otherwise wins over the
    # experiment's kind tag.
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_ID}")

"""MLflow's own tracking server and UI, opening in the model-training experience (``clbench ui`` serves this).

MLflow 3's UI opens in GenAI mode unless the browser chose otherwise (see :mod:`clbench.store.uiview`). This module is
MLflow's ASGI app (``mlflow.server.fastapi_app:app``, what ``mlflow ui`` runs under uvicorn) with two Flask
hooks: the UI's HTML page (always sent whole, never cached) gets :func:`clbench.store.uiview.page_script` as the first thing in its
``<head>``, which makes ``machine_learning`` the browser's workflow type unless it already has one, opens every
clbench experiment's runs table (and the base URL) on the leaderboard view and rounds the table's metric cells. Nothing else
changes: the same routes, API and store (the backend store URI comes from the environment ``mlflow ui`` sets).

``python -m clbench.store.uiserver --backend-store-uri URI --host H --port P`` starts it the way ``mlflow ui`` does
(MLflow's ``_run_server`` with this app), so store initialisation and environment are MLflow's own.
"""

from __future__ import annotations

import sys

from clbench.store.uiview import page_script

_HEAD = b"<head>"


def _clbench_experiments() -> tuple[list[tuple[str, str, int | None]], str | None]:
    """(id, name, creation time) of the served store's experiments that carry clbench's saved view (``clbench ui``
    tagged them before serving), and the id of the one whose latest run started last; none when the store cannot
    be read (the page then only sets the defaults)."""
    from clbench.store.uiview import VIEW_TAG

    try:
        from mlflow.entities import ViewType
        from mlflow.server.handlers import _get_tracking_store

        store = _get_tracking_store()
        exps = store.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50000)
        ours = [(e.experiment_id, e.name, e.creation_time) for e in exps if VIEW_TAG in (e.tags or {})]
        last = store.search_runs([e[0] for e in ours], "", ViewType.ACTIVE_ONLY, max_results=1,
                                 order_by=["attributes.start_time DESC"]) if ours else []
        return ours, (last[0].info.experiment_id if last else None)
    except Exception:  # noqa: BLE001 - the page must load whatever the store says
        return [], None


def _inject(response):
    """The UI's index page with clbench's page script first in its head (read afresh from the store on every load:
    never cached); every other response unchanged."""
    if response.mimetype != "text/html" or response.status_code != 200:
        return response
    response.direct_passthrough = False  # send_from_directory streams the file: read it to edit it
    body = response.get_data()
    if _HEAD in body and b"mlflow.workflowType_v1" not in body:
        response.set_data(body.replace(_HEAD, _HEAD + page_script(*_clbench_experiments()).encode(), 1))
        response.headers["Cache-Control"] = "no-store"  # the script lists the store's experiments of this moment
        for header in ("ETag", "Last-Modified"):
            response.headers.pop(header, None)
    return response


def _unconditional():
    """The index page is always sent whole: a browser holding a copy (from plain ``mlflow ui`` on this address, or
    an older list of experiments) would otherwise get 304 Not Modified and keep the copy."""
    from flask import request

    if request.method == "GET" and request.path.rstrip("/") == "":
        for header in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE"):
            request.environ.pop(header, None)


def _app():
    from mlflow.server import app as flask_app

    flask_app.before_request(_unconditional)
    flask_app.after_request(_inject)
    from mlflow.server.fastapi_app import app as asgi_app

    return asgi_app


def __getattr__(name: str):  # ``clbench.store.uiserver:app`` for uvicorn, built on first use (imports the server)
    if name == "app":
        app = _app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def command(backend_store_uri: str, host: str, port: int) -> list[str]:
    """The argv that serves ``backend_store_uri`` with this app (``clbench ui`` and the browser tests)."""
    return [sys.executable, "-m", "clbench.store.uiserver", "--backend-store-uri", backend_store_uri, "--host", host,
            "--port", str(port)]


MLFLOW_APP = "mlflow.server.fastapi_app:app"


def main(argv: list[str] | None = None) -> None:
    """``mlflow ui ARGS --workers 1`` (MLflow's own store initialisation and uvicorn command), with this module's
    app in the uvicorn command instead of MLflow's (the one argument ``_build_uvicorn_command`` gets as app)."""
    import mlflow.server
    from mlflow.cli import cli

    build = mlflow.server._build_uvicorn_command

    def ours(*args, **kwargs) -> list[str]:
        cmd = build(*args, **kwargs)
        if MLFLOW_APP not in cmd:  # another MLflow layout: serve MLflow's app unchanged rather than fail
            print(f"clbench ui: MLflow's app {MLFLOW_APP} not in its server command; serving it unchanged "
                  "(the UI may open in GenAI mode)", file=sys.stderr)
            return cmd
        return ["clbench.store.uiserver:app" if part == MLFLOW_APP else part for part in cmd]

    mlflow.server._build_uvicorn_command = ours
    cli.main(args=["ui", *(sys.argv[1:] if argv is None else argv), "--workers", "1"], prog_name="clbench ui",
            standalone_mode=True)


if __name__ == "__main__":
    main()

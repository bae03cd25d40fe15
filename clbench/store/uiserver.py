"""MLflow's own tracking server and UI, opening in the model-training experience (``clbench ui`` serves this).

MLflow 3's UI opens in GenAI mode unless the browser chose otherwise (see :mod:`clbench.store.uiview`). This module is
MLflow's ASGI app (``mlflow.server.fastapi_app:app``, what ``mlflow ui`` runs under uvicorn) with one Flask
``after_request`` hook: the UI's HTML page gets :func:`clbench.store.uiview.storage_script` as the first thing in its
``<head>``, which makes ``machine_learning`` the browser's workflow type unless it already has one. Nothing else
changes: the same routes, API and store (the backend store URI comes from the environment ``mlflow ui`` sets).

``python -m clbench.store.uiserver --backend-store-uri URI --host H --port P`` starts it the way ``mlflow ui`` does
(MLflow's ``_run_server`` with this app), so store initialisation and environment are MLflow's own.
"""

from __future__ import annotations

import sys

from clbench.store.uiview import storage_script

_HEAD = b"<head>"


def _inject(response):
    """The UI's index page with the workflow default first in its head; every other response unchanged."""
    if response.mimetype != "text/html" or response.status_code != 200:
        return response
    response.direct_passthrough = False  # send_from_directory streams the file: read it to edit it
    body = response.get_data()
    if _HEAD in body and b"mlflow.workflowType_v1" not in body:
        response.set_data(body.replace(_HEAD, _HEAD + storage_script().encode(), 1))
    return response


def _app():
    from mlflow.server import app as flask_app

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

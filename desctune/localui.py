"""Where `desctune ui` serves the Prefect and MLflow UIs of local runs (`desctune run`, whose own Prefect server is
temporary and whose MLflow store is a database file), so that every link such a run records leads there:
http://127.0.0.1:4200 and http://127.0.0.1:5000, or the ports DESCTUNE_UI_PREFECT_PORT and DESCTUNE_UI_MLFLOW_PORT
name (set them for both commands)."""

from __future__ import annotations

import os

from desctune.errors import ConfigError

PORT_ENV = {"prefect": "DESCTUNE_UI_PREFECT_PORT", "mlflow": "DESCTUNE_UI_MLFLOW_PORT"}
DEFAULT_PORT = {"prefect": 4200, "mlflow": 5000}


def port(which: str) -> int:
    """The port of `desctune ui`'s Prefect ("prefect") or MLflow ("mlflow") UI."""
    raw = os.environ.get(PORT_ENV[which], "").strip()
    if not raw:
        return DEFAULT_PORT[which]
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{PORT_ENV[which]}={raw}: a port is a number from 1 to 65535")
    return int(raw)


def url(which: str) -> str:
    """The address of `desctune ui`'s Prefect or MLflow UI, which the links of a local run name."""
    return f"http://127.0.0.1:{port(which)}"

"""What the commands share: the --config/--set flags, where Prefect keeps its cached results, and keeping user
errors to one line."""

from __future__ import annotations

import argparse
import logging
import os

from desctune.errors import UserError


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user."""
    return (UserError, FileNotFoundError)


def user_error_names() -> set[str]:
    """Class names of every user error, as Prefect writes them into its log lines ("DataError: ...")."""
    names, todo = {"FileNotFoundError"}, [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def unwrap(exc: BaseException) -> BaseException:
    """Prefect re-raises task failures; find the user error inside, if there is one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, user_errors()):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config and --set, for the commands that read the registry a profile names."""
    p.add_argument("--config", help="YAML profile (its artifacts_dir and registry section say which store)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")


def config_from_args(args: argparse.Namespace):
    """The Config those flags give, with MLflow's and alembic's chatter kept below warnings."""
    from desctune.config import load_config

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return load_config(args.config, args.set)


def prefect_env(artifacts_dir: str) -> None:
    """Keep Prefect's cached task results next to the artifacts they describe, so deleting one deletes both (for an
    object store, see `tasks.stage.result_storage`); give Prefect's temporary API server more than its default 20 s to start,
    which busy cores can exceed."""
    from desctune.store import local_root

    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH",
                          str(local_root(artifacts_dir).resolve() / "prefect-results"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's telemetry service logs an ERROR every ten minutes on a machine without internet access,
    # in the middle of a run's progress lines; set it to true to send Prefect its usage statistics.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def prefect_database(artifacts_dir: str) -> str:
    """The database `desctune run` records its flow runs in and `desctune ui` shows: PREFECT_API_DATABASE_CONNECTION_URL
    when set, else a SQLite file in the (local) artifacts folder, which outlives the run's temporary server and is
    deleted with the artifacts it describes (the folder is created: SQLite creates no folder)."""
    from desctune.store import local_root

    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return os.environ["PREFECT_API_DATABASE_CONNECTION_URL"]
    folder = local_root(artifacts_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{folder / 'prefect.db'}"


def password_to_env(cfg):
    """`cfg` without a password in registry.tracking_uri: a URI that has one moves to this process's
    MLFLOW_TRACKING_URI (which `desctune.tracking.tracking_uri` reads next), since the config becomes the flow run's
    parameters, which Prefect stores and shows; the environment reaches every task and training process unrecorded."""
    from desctune.tracking import has_password

    uri = cfg.registry.tracking_uri
    if not has_password(uri):
        return cfg
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": None})})


class HideUserErrors(logging.Filter):
    """Drop Prefect's log records about a user-fixable error (tracebacks included): the CLI prints it as one line."""

    def __init__(self) -> None:
        super().__init__()
        self.names = user_error_names()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(unwrap(exc), user_errors()):
            return False
        message = record.getMessage()
        return not any(f"{name}(" in message or f"{name}:" in message for name in self.names)


def quiet_user_errors() -> None:
    """Attach HideUserErrors to every handler Prefect has set up."""
    hide = HideUserErrors()
    for name in ["", *logging.Logger.manager.loggerDict]:
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if not any(isinstance(f, HideUserErrors) for f in handler.filters):
                handler.addFilter(hide)

"""The base of every error a user can fix: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix; its message is one plain line that says how."""


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a mistake the user must fix first."""
    return not isinstance(state.result(raise_on_failure=False), UserError)

"""The base of every error a user can fix: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix; its message is one plain line that says how."""

"""Every error a user can fix, in one place: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix; its message is one plain line that says how."""


class ConfigError(UserError, ValueError):
    """A profile or an override that does not fit the Config model."""


class DataError(UserError, ValueError):
    """Input data the user must fix (missing, empty, not JSON Lines, undecodable, truncated)."""


class ModelError(UserError, RuntimeError):
    """The base model cannot be provided; the message says how to fix it, in one sentence."""


class AdapterError(UserError, RuntimeError):
    """The adapter is missing, empty or not applied; the message says which."""


class ModelRefError(UserError):
    """A model reference names nothing usable; the message says what exists instead."""


class NoRegisteredModel(ModelRefError):
    """The registry has no model of that name yet: nothing has been trained and registered."""


class RegistryError(UserError):
    """A model, version or alias the user named is not in the registry, or a move is impossible."""


class ServeError(UserError):
    """The servers cannot start: a port is taken, another serve runs, a server did not come up."""


class ExportError(UserError):
    """An export cannot be written: unknown format or type, an output folder in use, an architecture not supported."""


class StoreError(UserError):
    """The artifacts store (an object-store URL) cannot be used: unknown scheme, missing driver, unreachable, or a
    folder a result names was never published there."""

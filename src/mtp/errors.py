"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a name, a flag value). The message names the problem and the fix."""


class NoRoomYet(UserError):
    """Rows that fit the engine, but not beside the rows running now: a server lets them wait for a row to leave
    (alone, the same request is refused with this message)."""

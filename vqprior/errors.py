"""The exceptions the library raises for problems with the user's input (bad files, bad options, mismatched inputs).

The CLI turns a ``UserError`` into a one-line message and a non-zero exit; anything else is a bug and keeps its
traceback. ``InputError`` is the ``UserError`` of a library call's arguments: it is also a ``ValueError``, so
Python callers can catch the usual type.
"""


class UserError(Exception):
    """A problem with the user's input that a one-line message explains."""


class InputError(UserError, ValueError):
    """A bad argument to a library call (a shape, a range, a missing label), explained in one line."""

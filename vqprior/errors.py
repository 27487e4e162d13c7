"""The one exception type the library raises for user errors (bad files, bad options, mismatched inputs).

The CLI turns it into a one-line message and a non-zero exit; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input that a one-line message explains."""

"""The one exception type for problems the user can fix (bad path, bad flag, corrupted file).

The CLI turns it into a one-paragraph message and exit code 2; internal invariants use assert instead.
It subclasses ValueError so library callers can catch it the usual way.
"""


class UserError(ValueError):
    pass

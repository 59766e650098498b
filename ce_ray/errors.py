"""The one exception type for failures a user can cause (bad config, bad input, missing files).

The CLI prints these as a single clear line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names it and says what to do."""

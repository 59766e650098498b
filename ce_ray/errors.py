"""The exception types for failures a user can cause (bad config, bad input, missing files).

The CLI prints these as a single clear line and exits non-zero; anything else is a bug and keeps
its traceback. Serve answers an InpaintError with a 4xx JSON body naming its code.
"""


class UserError(Exception):
    """A problem the user can fix: the message names it and says what to do."""


class InpaintError(UserError):
    """A bad image or mask to inpaint, with a stable `code` an API can return (e.g. "mask_size_mismatch")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

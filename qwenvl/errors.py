"""User-facing errors: anything the user can fix (a bad file, a bad argument, a bad image).

The CLI prints ``str(error)`` as one line and exits 2; the server maps it to a 4xx.
Programming errors stay ordinary exceptions.
"""


class QwenVLError(Exception):
    """A problem with the user's input: its message is shown as-is, on one line."""


class ModelFileError(QwenVLError):
    """A model file or directory is missing, malformed, or does not match its config."""


class MediaError(QwenVLError):
    """An image or video could not be read or is not acceptable."""


class RequestError(QwenVLError):
    """A generation request is invalid (empty prompt, bad sampling values, too long)."""


class BusyError(QwenVLError):
    """The engine cannot take more work right now (its queue is full): try again later."""

"""Errors a user can cause. The CLI prints their message as one line, not a traceback."""


class DffError(Exception):
    """A problem with the user's input: the message names the file or field and the fix."""


class CheckpointError(DffError):
    """A file that is not a dff-trt checkpoint, or one that does not match its config."""

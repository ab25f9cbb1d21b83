"""Errors a user can fix: the CLI prints their message as one line and exits non-zero, without a traceback."""


class InputError(Exception):
    """Bad input (a path, a value, a file's content, a model that will not load), named in one line."""


class GuidanceError(InputError):
    """Guidance that cannot act as asked: an unsupported pipeline, or no classifier-free guidance to join."""

"""Errors with a one-line message for the user (the CLI prints them without a traceback)."""


class InputError(Exception):
    """Bad input (a path, a value, a file's content, a model that will not load), named in one line."""


class GuidanceError(InputError):
    """Guidance that cannot act as asked: an unsupported pipeline, or no classifier-free guidance to join."""


class UnsupportedPipelineError(GuidanceError):
    """A pipeline the guidance engine cannot serve (named, with the reason, in one line)."""


class GuidanceOffError(GuidanceError):
    """Guidance terms were asked for in a call that runs without classifier-free guidance (strict mode)."""

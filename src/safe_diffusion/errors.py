"""Errors a user can fix: the CLI prints their message as one line and exits non-zero, without a traceback."""


class InputError(Exception):
    """Bad input (a path, a value, a file's content, a model that will not load), named in one line."""


class UnsupportedPipelineError(InputError):
    """A pipeline the guidance engine cannot serve (named, with the reason, in one line)."""


class GuidanceOffError(InputError):
    """Guidance terms were asked for in a call that runs without classifier-free guidance (strict mode)."""

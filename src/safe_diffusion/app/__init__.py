"""The local web demo: unguided and guided images side by side (``safe-diffusion demo``).

:mod:`.core` validates and generates without any UI; :mod:`.ui` builds the Gradio page around it.
Only :mod:`.ui` imports gradio (the ``app`` extra).
"""

from .core import DemoGenerator, DemoRequest, DemoResult, Edit, parse_edits, validate_request

__all__ = ["DemoGenerator", "DemoRequest", "DemoResult", "Edit", "parse_edits", "validate_request"]

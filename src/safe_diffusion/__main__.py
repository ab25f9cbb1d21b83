"""``python -m safe_diffusion`` (and ``accelerate launch -m safe_diffusion``) runs the command line."""

from .cli import main

main()

"""Helpers shared by test modules (fixtures live in conftest.py)."""


def run_cli(*args: str) -> int:
    """Run the console entry point in-process and return its exit status."""
    from safe_diffusion.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0

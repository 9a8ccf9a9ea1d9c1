"""The `maxmatch` command line: thin Typer commands over the library, one module per command group."""

from maxmatch_cli.cli.app import app, main

__all__ = ["app", "main"]

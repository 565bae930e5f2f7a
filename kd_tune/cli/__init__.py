"""``kd-tune``'s command line: :mod:`kd_tune.cli.app` builds the parser from the table of subcommands."""

from kd_tune.cli.app import main, run

__all__ = ["main", "run"]

"""``python -m kd_tune.cli``: what the ``kd-tune`` script runs (Ray jobs run it so)."""

from kd_tune.cli.app import run

run()

"""The trial name functions Tune pickles into its experiment state.

Whatever reads that state back (``kd-tune status``, ``Tuner.restore``) imports this module: it imports only the
trial codec (plain Python), not torch or MLflow.
"""

from __future__ import annotations

from typing import Any

from kd_tune.space import trials


def trial_name(trial: Any) -> str:
    """A trial's name in Tune's table and logs: its grid point's (or pack's) label."""
    return trials.TrialConfig.decode(trial.config).label


def trial_dirname(trial: Any) -> str:
    """A trial's folder in the sweep's: readable, and computable inside the trial from its config and id.

    Tune pickles both name functions into its experiment state, and whatever reads that state back
    (``kd-tune status``, ``Tuner.restore``) imports their module: here, not beside torch and MLflow."""
    return trials.trial_folder_name(trial.config, str(trial.trial_id))

"""Every name kd-tune writes into MLflow: tags, metric names, artifact names and the store's limits.

Plain constants (no imports): the report layer reads runs back by these names without importing MLflow's
writers, torch or Ray. Runs are found again by tags, never by memory alone, so a name changed here is a
record that older sweeps cannot be matched with.
"""

from __future__ import annotations

from kd_tune.space.trial_report import REPORTED_METRICS, SCHEDULE_METRICS

# --- finding runs ------------------------------------------------------------------------------
TAG_SWEEP = "kd_tune.sweep"
"""The sweep's name, on each of its runs."""
TAG_ROLE = "kd_tune.role"
"""``sweep`` (the parent run), ``teacher``, ``student`` (a distilled grid point) or ``scratch`` (a baseline)."""
TAG_TRIAL = "kd_tune.trial_id"
"""The Ray trial that trains the run's grid point."""
TAG_EPOCHS = "kd_tune.epochs"
"""The grid point's epochs (a trial shared by several epochs values has a run per value)."""
TAG_LABEL = "kd_tune.trial"
"""The trial's label (a pack trial: the member's), e.g. ``a0.5-T3-e1+2-s0``."""
TAG_PARENT = "mlflow.parentRunId"
"""MLflow's own: the parent run, which the UI unfolds into its children."""
# --- where and how a run's trial ran -------------------------------------------------------------
TAG_NODE = "kd_tune.node_id"
"""The Ray node of the trial's latest attempt."""
TAG_NODES = "kd_tune.nodes"
"""Every node the trial ran on, in order (a retry after a node died adds one)."""
TAG_NODE_IP = "kd_tune.node_ip"
TAG_HOSTNAME = "kd_tune.hostname"
TAG_DEVICE = "kd_tune.device"
TAG_RETRIES = "kd_tune.retries"
"""How often Tune restarted the trial from its checkpoint."""
# --- how a run ended ----------------------------------------------------------------------------
TAG_ERROR = "kd_tune.error"
"""The last line of a failed trial's error (or of its divergence)."""
TAG_DIVERGED = "kd_tune.diverged"
"""``true`` when the loss went NaN or infinite (the run is FAILED; a retry would diverge again)."""
TAG_MODEL_ERROR = "kd_tune.model_error"
"""Why the run has no MLflow model (its ``student.pt`` is still logged)."""
TAG_STOPPED = "kd_tune.stopped_early"
"""``true`` on a search trial the scheduler (ASHA) stopped."""
TAG_STOPPED_AT = "kd_tune.stopped_at_epoch"
"""The last epoch a stopped trial trained."""
TAG_DISCARDED = "kd_tune.discarded"
"""Why a run was deleted: its trial was created after Ray's last saved state and lost with the driver."""
# --- the parent run and the teachers' runs -----------------------------------------------------------
TAG_EXPLOIT = "kd_tune.exploit.e"
"""Prefix of a PBT exploit's tag: ``kd_tune.exploit.e0004`` = ``epoch 4: a0.31-T5-e10-s0 cloned a0.84-T5-e10-s0``, one tag per
exploit in the chain behind the run's final weights (its own, and those its donors inherited), set when the run ends
(as ``schedule.json``): following the donors' runs leads back to the first epochs."""
TAG_LINEAGE = "kd_tune.lineage"
"""A PBT member's exploits in one line (``epoch 4: cloned a0.84-T6.3-e8-s0 (1a3b7_00001); ...``), set when its run ends."""
SCHEDULE_ARTIFACT = "schedule.json"
"""A run's alpha and T of every epoch that trained its final weights, and its exploits (``kd_tune.space.lineage``): what
``kd-tune replay`` trains again."""
TAG_PATH = "kd_tune.path"
"""The sweep's folder in its storage (on the parent run)."""
TAG_MEMBER = "kd_tune.member"
"""A teacher run's index in its ensemble."""
TAG_LABEL_NOISE = "kd_tune.label_noise"
"""The label-noise level a teacher learned from."""
TAG_TEACHER_KEY = "kd_tune.teacher_key"
"""The teacher's key in the teacher cache."""
TAG_TEACHER = "kd_tune.teacher"
"""A teacher run's ``grid.teacher`` entry (only where teachers are an axis of the grid)."""
TAG_SOURCE = "kd_tune.teacher_source"
"""Where a pre-trained teacher was read from (``teacher.from``)."""
TAG_CACHED = "kd_tune.cached"
"""``true`` when the teacher came from the cache rather than being trained by this sweep."""
TAG_SELECTED_ON = "kd_tune.selected_on"
"""``validation`` or ``test``: what the best configuration on the parent run was selected on."""
TAG_PREPROCESSING = "kd_tune.preprocessing"
# --- MLflow's own markers ---------------------------------------------------------------------------
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The value MLflow's UI reads (server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, "Model training" in
# its switch): an MLflow 3 experiment without it opens on the GenAI overview instead of its runs.
EXPERIMENT_KIND = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"
"""mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT: what the UI shows beside a dataset."""
# --- metrics, artifacts, limits ------------------------------------------------------------------
EPOCH_METRICS = REPORTED_METRICS
"""What a run logs per epoch (step = epoch): what a trial reports (the training layer's ``EpochMetrics`` fields, and
``epoch_alpha`` / ``epoch_T`` where they change during training)."""
EVERY_RUN_METRICS = tuple(m for m in EPOCH_METRICS if m not in SCHEDULE_METRICS)
"""What every student's run logs per epoch (one with a constant alpha and T logs no ``epoch_alpha`` / ``epoch_T``)."""
CONFUSION_ARTIFACT = "confusion_matrix.json"
MAX_PARAM_LEN = 6000
"""The longest param value MLflow's stores take."""


def best_tag(selection: str, key: str) -> str:
    """A parent run's tag of a selected configuration: ``kd_tune.best.alpha``, ``kd_tune.best_distilled.run_id``, ..."""
    return f"kd_tune.{selection}.{key}"


def exploit_tag(epoch: int) -> str:
    """The tag of a PBT exploit at the end of ``epoch`` (:data:`TAG_EXPLOIT`)."""
    return f"{TAG_EXPLOIT}{epoch:04d}"

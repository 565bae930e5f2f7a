"""Sweeps on Ray Tune: storage, the sweep's files and Tune's state, the cluster, teachers, the trainable, the
MLflow callback, searches, the driver, results, sync and jobs. The one layer that imports Ray."""

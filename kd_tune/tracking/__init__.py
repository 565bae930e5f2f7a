"""The MLflow record of a sweep: tag names, the store, experiments and runs, datasets, models, the run recorder,
the outbox that ships writes while the store may be away, the UI. MLflow and the training layer; never Ray."""

"""The training layer: models and losses by name (registries), the training loop, packed students, metrics,
checkpoints, the teacher. PyTorch only: never Ray, MLflow or pyarrow (it runs on a bare GPU machine)."""

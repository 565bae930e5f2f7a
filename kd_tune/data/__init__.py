"""Datasets by name, held in memory as tensors: the registry's facts (plain Python), their files, the splits.
PyTorch and numpy; never Ray or MLflow."""

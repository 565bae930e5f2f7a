"""kd-tune: distributed hyperparameter sweeps for knowledge distillation (Ray Tune + MLflow + PyTorch).

Layers, each a subpackage that imports only those before it (tests/test_layers.py checks it): the core
(``errors``, ``files``: the standard library), ``spec`` (plain Python), ``data`` and ``distill`` (PyTorch),
``tracking`` (MLflow), ``report`` (pandas, MLflow reads), ``sweep`` (Ray Tune) and ``cli``.
"""

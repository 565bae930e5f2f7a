"""A sweep's state on disk, in its storage (a folder, NFS or an object store): the storage itself, the sweep's own
files, Ray Tune's experiment state and the trials' checkpoints as kd-tune reads and repairs them, and ``sync``, which
rebuilds the MLflow record from them."""

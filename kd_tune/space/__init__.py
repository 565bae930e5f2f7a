"""What a sweep is: search spaces, their validation, trials and the command-line settings. Plain Python and PyYAML:
no torch, Ray, MLflow or numpy, so validating a space or printing ``--help`` costs nothing."""

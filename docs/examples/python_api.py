"""kd-tune from Python: a sweep from a dict, its results as pandas DataFrames, its report (docs/python-api.md).

Run it from any folder: the sweep lives in ./kd_tune_results, its MLflow record in ./mlflow.db, its report in
./reports/api_example, and MNIST is fetched into ~/.cache/kd-tune/data (or $KD_TUNE_DATA_DIR) if it is not there.
About a minute on a 2-core laptop; run it again and the finished sweep is loaded, not trained again.
"""

import kd_tune

# The same keys as a search-space YAML file (docs/search-spaces.md): tiny models on 1,000 MNIST digits, 100 more held
# out for validation; alpha 0.5 and 1 at T = 3, for 1 and 2 epochs (one trial serves both), and a scratch baseline.
space = {
    "name": "api_example",
    "dataset": {"name": "mnist", "train_size": 1000, "val_size": 100},
    "teacher": {"widths": [8, 16], "epochs": 1, "lr": 0.003, "batch_size": 64},
    "student": {"widths": [4, 8], "lr": 0.003, "batch_size": 64},
    "grid": {"alpha": [0.5, 1.0], "temperature": [3.0], "epochs": [1, 2], "seed": [0]},
    "baselines": ["scratch"],
    "resources": {"cpu": 1, "gpu": 0},
}

# Bad input is refused before anything starts, with the one line `kd-tune sweep` would print.
try:
    kd_tune.run({**space, "grid": {**space["grid"], "alpha": [0.5, 1.5]}})
except kd_tune.UsageError as e:
    print(f"refused: {e}")

# The sweep: a local Ray is started for it and stopped after (or the one this process started with ray.init() is
# joined and left running). One progress line every 20 s; Ctrl+C stops it, resumable with kd_tune.resume("api_example").
sweep = kd_tune.run(space, resume=True)  # resume=True: a second run of this script continues (or just loads) the sweep

# One row per grid point, as `kd-tune sweep` ends with.
table = sweep.table()
print(table[["role", "alpha", "epochs", "status", "test_acc"]].to_string(index=False))

# The MLflow record as `kd-tune report` reads it: one row per run, with its params and last metrics.
runs = sweep.runs()
print(runs[["role", "alpha", "epochs", "seed", "status", "test_acc", "val_acc"]].to_string(index=False))

# The configuration selected on validation, reported on test, with its gain over the scratch student of the same seed.
best = sweep.best()
assert best is not None
print(f"selected: alpha {best.alpha:g}, T {best.temperature:g}, {best.epochs} epochs: test accuracy {100 * best.mean:.2f} %, "
      f"{100 * best.gain:+.2f} points over scratch")

# Later, in another notebook or process: the same sweep by name (its storage and MLflow store are found as the CLI finds them).
again = kd_tune.load("api_example")
print(again.status().format())  # `kd-tune status api_example`
report = again.report("reports/api_example")  # `kd-tune report api_example --out reports/api_example`
print("report files:", ", ".join(f.name for f in report.files))

"""Reports read back from MLflow: tidy runs, statistics over seeds, figures, the summary on the parent run.
pandas, SciPy, matplotlib and MLflow; never torch or Ray."""

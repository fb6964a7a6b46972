"""The decision report: `tunesmith compare TASK.yaml` runs every route that applies to a task (prompting,
in-context learning, retrieval, classifier repurposing, fine-tuning, the hybrid) on the same test set and
reports quality with confidence intervals next to what each route costs.

task.py (the typed task file) -> data.py (prepared splits, fingerprint) -> harness.py (one child process
per route, cached) -> routes.py (what each route does, with predict.py's scoring) -> recommend.py and
report.py (the numbers, plots and the recommendation computed from them).
"""

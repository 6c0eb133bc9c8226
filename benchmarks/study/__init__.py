"""The method study of docs/ablations.md: data families (data.py) and the runner (run.py)."""

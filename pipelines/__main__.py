"""Entry point for every job: `python -m pipelines <job> [args]`.

    python -m pipelines info conf/mixtral_8x7b.yaml
"""

from __future__ import annotations

import importlib
import sys
import warnings

from app.errors import UserError

# job name -> module with `main(argv) -> int`; imported lazily so `info` does not load Lightning.
JOBS = {
    "info": "pipelines.info",
    "train": "pipelines.train",
    "eval": "pipelines.eval",
    "compare": "pipelines.compare",
    "bench": "pipelines.bench",
    "sync": "pipelines.sync",
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a warning is one line, like an error
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m pipelines <job> [args]   jobs: {', '.join(JOBS)}")
        return 0
    job, rest = (argv[0], argv[1:]) if argv else (None, [])
    try:
        if job is None:
            raise UserError(f"no job given: python -m pipelines <job> [args]; jobs: {', '.join(JOBS)}")
        if job not in JOBS:
            raise UserError(f"unknown job '{job}': choose one of {', '.join(JOBS)}")
        return importlib.import_module(JOBS[job]).main(rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops cleanly by itself): nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

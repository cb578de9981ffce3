"""A Ray job's entrypoint for one step: `python -m flows.stage_job '<{"stage": ..., "config": ...}>'`.

Cluster mode (flows/jobs.py) sends the step's typed config as JSON; this rebuilds the same step
(its checks run again) and calls the same stage function an embedded run calls. A user-caused
error prints one `capfilt: error:` line and exits 2, which the flow reads as "retrying will not help".
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from capfilt import logs
    from capfilt.environment import apply_defaults
    from capfilt.errors import CapfiltError
    from capfilt.packages import check_own_packages

    apply_defaults()  # before any stage imports Ray, Prefect or transformers
    logs.configure()  # the submitting capfilt's verbosity, passed in the job's environment
    args = sys.argv[1:] if argv is None else argv
    try:
        check_own_packages()  # `flows`, `pipeline`, ... are capfilt's own, not another install's
        from flows.steps import step_from_data

        if len(args) != 1:
            raise CapfiltError("usage: python -m flows.stage_job '{\"stage\": ..., \"config\": ...}'")
        step = step_from_data(json.loads(args[0]))
        step.execute(say=lambda line: print(line, flush=True))
    except CapfiltError as exc:
        print(f"capfilt: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

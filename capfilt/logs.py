"""How much capfilt says: `--quiet`, the default, `--verbose` (every command accepts them).

| verbosity | capfilt's own loggers | libraries (transformers, open_clip, Ray, Prefect, ...) | progress |
|---|---|---|---|
| quiet   | WARNING | WARNING (ERROR for the chattiest) | off |
| default | INFO    | WARNING                           | on a terminal: bars; else one line per logged step |
| verbose | DEBUG   | INFO                              | as default |

The choice travels in the environment (`CAPFILT_LOG_LEVEL`, plus the libraries' own variables:
TRANSFORMERS_VERBOSITY, PREFECT_LOGGING_LEVEL), because much of what capfilt runs reads its
level there, not here: Ray workers, a stage submitted as a Ray job, Prefect's logging set up at
its import, transformers at its first log call. Standard library only, so any layer may import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping

ENV = "CAPFILT_LOG_LEVEL"
QUIET, DEFAULT, VERBOSE = "quiet", "info", "verbose"
VERBOSITIES = (QUIET, DEFAULT, VERBOSE)

# capfilt's own code lives in these top-level packages; Prefect's flow/task run loggers carry
# capfilt's step lines (flows/tasks.py), so they follow capfilt's level, not Prefect's.
OWN = ("capfilt", "flows", "pipeline", "model", "schemas", "prefect.flow_runs", "prefect.task_runs")
LIBRARIES = ("transformers", "open_clip", "ray", "prefect", "torch", "timm", "img2dataset", "huggingface_hub",
             "httpx", "urllib3", "fsspec", "PIL", "faiss")
# Loggers that say little worth reading at WARNING in a quiet run (Ray prints cluster start-up notes there).
NOISY = ("ray", "img2dataset")

# verbosity -> (own level, library level, quiet-mode library level for NOISY)
LEVELS = {
    QUIET: (logging.WARNING, logging.WARNING, logging.ERROR),
    DEFAULT: (logging.INFO, logging.WARNING, logging.WARNING),
    VERBOSE: (logging.DEBUG, logging.INFO, logging.INFO),
}
ALIASES = {"warning": QUIET, "error": QUIET, "debug": VERBOSE, "default": DEFAULT}


def verbosity(environ: MutableMapping[str, str] = os.environ) -> str:
    """The verbosity in force: CAPFILT_LOG_LEVEL (quiet, info or verbose; also warning/debug), else info."""
    value = (environ.get(ENV) or DEFAULT).strip().lower()
    value = ALIASES.get(value, value)
    return value if value in VERBOSITIES else DEFAULT


def is_quiet(environ: MutableMapping[str, str] = os.environ) -> bool:
    return verbosity(environ) == QUIET


def library_level(name: str, level: str | None = None) -> int:
    own, library, noisy = LEVELS[level or verbosity()]
    return noisy if name in NOISY else library


def configure(level: str | None = None, environ: MutableMapping[str, str] = os.environ) -> str:
    """Apply a verbosity to this process and record it in `environ` for every process it starts.

    `level` None: keep what the environment says (a parent capfilt's choice, or the default).
    An explicit level overrides the libraries' variables too: the user just asked for it.
    """
    if level is None:
        level = verbosity(environ)
        set_env = environ.setdefault
    else:
        if level not in VERBOSITIES:
            raise ValueError(f"verbosity {level!r}: use one of {', '.join(VERBOSITIES)}")
        set_env = environ.__setitem__
    environ[ENV] = level
    own, library, _ = LEVELS[level]
    set_env("TRANSFORMERS_VERBOSITY", logging.getLevelName(library).lower())
    set_env("PREFECT_LOGGING_LEVEL", logging.getLevelName(library))
    # Prefect's logging.yml (applied when Prefect is imported) resets these loggers; its
    # PREFECT_LOGGING_<path> variables are how to keep capfilt's levels through that.
    for name in ("FLOW_RUNS", "TASK_RUNS"):
        set_env(f"PREFECT_LOGGING_LOGGERS_PREFECT_{name}_LEVEL", logging.getLevelName(own))
    set_env("PREFECT_LOGGING_ROOT_LEVEL", logging.getLevelName(library))
    for name in OWN:
        logging.getLogger(name).setLevel(own)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level(name, level))
    if "transformers" in sys.modules:  # already imported: it read TRANSFORMERS_VERBOSITY before
        import transformers

        transformers.logging.set_verbosity(library)
    root = logging.getLogger()
    root.setLevel(library)  # libraries logging through the root logger (open_clip) and unnamed ones
    if not root.handlers:
        # Without a handler Python prints only WARNING and up, as bare text (and open_clip's
        # `logging.warning` would install the "WARNING:root:" format). Prefect, once imported,
        # replaces this handler with its own console handler.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    return level


# open_clip (factory.create_model) on a model built without weights, via the root logger:
# "No pretrained weights loaded for model '<name>'. Model initialized randomly."
RANDOM_INIT = "Model initialized randomly."


class _DropMatching(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def expected(text: str, logger: str = "") -> Iterator[None]:
    """Within the block, drop records of `logger` (root by default) containing `text`.

    For a library warning about what capfilt does on purpose (open_clip warns "initialized
    randomly" when capfilt builds a model it is about to train): a warning there would teach users
    to ignore warnings. Scoped to the block, so the same record from any other call still shows.
    """
    target, drop = logging.getLogger(logger), _DropMatching(text)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)

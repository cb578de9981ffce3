"""User-facing errors.

Anything a user can cause (bad input file, wrong schema, bad config, unreachable source)
raises a subclass of CapfiltError whose message names the file/row/option and says what to do.
The CLI prints such errors as one line and exits non-zero; everything else is a bug and keeps
its traceback.
"""


class CapfiltError(Exception):
    """An error caused by input or configuration, with a message that says how to fix it."""


class SchemaError(CapfiltError):
    """A table or file does not match the capfilt schema it is supposed to have."""


class ConfigError(CapfiltError):
    """A stage configuration (CLI option, flow parameter, config file) is invalid."""


class AccountingError(CapfiltError):
    """Rows were lost or duplicated: rows in != kept + rejected + failed for a shard."""


def first_line(exc: BaseException) -> str:
    """What a library's exception says, in one line, for the end of a capfilt error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Training progress: a tqdm bar on a terminal; in a log file or a Prefect task, one plain line per
logged step instead (no carriage returns or ANSI codes in files); nothing with --quiet."""

from __future__ import annotations

from capfilt.logs import is_quiet


class Progress:
    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.desc, self.total = desc, total
        enabled = enabled and not is_quiet()  # --quiet: no bar and no progress lines
        # disable=None: tqdm turns itself off when stderr is not a terminal
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=None if enabled else True)
        self.lines = enabled and self.bar.disable

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def report(self, step: int, **values: str) -> None:
        """The latest logged values: the bar's postfix, or one line when there is no bar."""
        if self.lines:
            shown = " ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc}: step {step}/{self.total} {shown}", flush=True)
        else:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()

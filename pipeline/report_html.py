"""What both report pages share: number formatting, Jinja2 templates, the stylesheet, plots.

Numbers are shown for reading: counts as integers with thousands separators, fractions to
three decimals, a missing value as "—" (never 0: a run without an ITM scorer has no ITM score,
not a score of zero).
"""

from __future__ import annotations

import io
import math
from importlib import resources

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

MISSING = "—"
STYLESHEET = "style.css"


def number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def signed(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:+.{digits}f}".replace("-", "−")


def percent(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{100 * value:.{digits}f}%"


def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=number, signed=signed, percent=percent)
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(stylesheet=STYLESHEET, **context)


def stylesheet() -> str:
    return resources.files("pipeline").joinpath("templates", STYLESHEET).read_text()


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

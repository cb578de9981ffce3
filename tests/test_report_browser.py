"""The report pages as a reader sees them: rendered by headless Chromium, every image loaded, the
verdict and the tables on screen, the stylesheet applied.

Each page is loaded next to itself (same folder, so its relative links resolve) with a short
script appended that, once the page has loaded, writes what it found into the <body>'s
attributes; `--dump-dom` hands the DOM back. CI (.ci/run) installs Debian's chromium; where it
is absent locally the test is skipped with that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.report_world import make_bootstrap

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI's .ci/run installs it: "
                                                          "apt-get install -y chromium)")

PROBE = """<script>
window.addEventListener("load", () => {
  const b = document.body;
  const images = Array.from(document.images);
  b.dataset.images = images.length;
  b.dataset.broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")).join(" ");
  const shown = id => {
    const e = document.getElementById(id);
    if (!e) return "missing";
    const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return r.width > 0 && r.height > 0 && s.display !== "none" && s.visibility !== "hidden" ? "yes" : "no";
  };
  b.dataset.visible = ["verdict", "comparison", "summary", "reasons"].map(id => id + "=" + shown(id)).join(" ");
  const v = document.getElementById("verdict");
  b.dataset.styled = v && getComputedStyle(v).borderLeftWidth === "6px" ? "yes" : "no";
  b.dataset.probed = "yes";
});
</script>"""


def render_all(pages: dict[str, Path], tmp_path: Path) -> dict[str, dict[str, str]]:
    """Load every page in headless Chromium at once; per page, what the probe saw (body data-* attributes).

    In parallel: a Chromium start takes seconds, most of it waiting, not computing.
    """
    running = {}
    for name, page in pages.items():
        probe = page.with_name(f".probe-{page.name}")
        probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        running[name] = (probe, subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / f'chromium-{name}'}", "--virtual-time-budget=5000", "--dump-dom",
             probe.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    seen = {}
    for name, (probe, process) in running.items():
        try:
            out, err = process.communicate(timeout=180)
        finally:
            probe.unlink()
        body = re.search(r"<body([^>]*)>", out)
        assert body, f"chromium gave no DOM for {pages[name]} (exit {process.returncode}): {err[-2000:]}"
        seen[name] = dict(re.findall(r'data-([a-z]+)="([^"]*)"', body.group(1)))
    return seen


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    built = make_bootstrap(tmp_path_factory.mktemp("reports"))
    pages = {name: built[name] for name in ("index", "filter_r0", "filter_r1")}
    return render_all(pages, tmp_path_factory.mktemp("chromium"))


@pytest.mark.parametrize("name", ["index", "filter_r0", "filter_r1"])
def test_every_report_page_renders_with_its_images_verdict_and_tables(seen, name):
    page = seen[name]
    assert page.get("probed") == "yes", page
    assert int(page["images"]) >= (2 if name == "index" else 4)  # plots and sample thumbnails
    assert page["broken"] == "", f"images that did not load: {page['broken']}"
    assert "verdict=yes" in page["visible"] and page["styled"] == "yes", page
    tables = ("comparison",) if name == "index" else ("summary", "reasons")
    assert all(f"{t}=yes" in page["visible"] for t in tables), page

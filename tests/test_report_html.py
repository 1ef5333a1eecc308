"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``) loads the
self-contained ``report.html`` offline; every table is shown and every embedded image
decodes (``naturalWidth > 0``); a screenshot is saved next to the test's report copy.

Chromium is driven without extra Python dependencies: a small script injected into a copy
of the report writes, on ``load``, the images' natural widths and the tables' sizes into
``<body data-...>``; ``--dump-dom`` prints the DOM after the load handler ran.
Under CI (``CI`` set) or with ``GRADSWEEP_INSTALL_CHROMIUM=1`` a missing Chromium is
installed with apt-get; under CI a Chromium that cannot be had fails the test.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from analysis.__main__ import main
from sweeper.store import RunStatus, Store
from sweeper.store.models import Run

pytestmark = pytest.mark.slow  # real jobs, servers or browsers

PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var tables = Array.prototype.slice.call(document.querySelectorAll("table"));
  var b = document.body.dataset;
  b.imgWidths = imgs.map(function (i) { return i.complete ? i.naturalWidth : 0; }).join(",");
  b.tableHeights = tables.map(function (t) { return t.getBoundingClientRect().height; }).join(",");
  b.tableRows = tables.map(function (t) { return t.rows.length; }).join(",");
  b.probe = "done";
});
</script>"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def _run(i: int, method: str, alpha: float | None, seed: int, test: float, **kw) -> Run:
    defaults = dict(model="resnet18", data="imagenet", batch_size=256, epochs=90,
                    schedule="cosine", label_smoothing=0.0, status=RunStatus.done)  # fmt: skip
    defaults.update(kw)
    return Run(
        config_hash=f"{i:064x}",
        method=method,
        alpha=alpha,
        lr=0.1,
        seed=seed,
        config={"i": i},
        epoch=defaults["epochs"],
        train_acc=test + 0.4,
        test_acc=test,
        test_loss=1.6 - test / 100,
        logit_norm=20.0 + (alpha or 0.0) * 10,
        **defaults,
    )


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with baseline + PGT at several alphas and seeds (ImageNet resnet18 cosine,
    as in the paper's Table 1), one failed run, and the report built by the CLI entry."""
    d = tmp_path_factory.mktemp("html_results")
    rng = np.random.default_rng(1)
    runs: list[Run] = []
    for method, alpha, bump in [("baseline", None, 0.0), ("pgt", 0.1, 0.1), ("pgt", 0.25, 0.3),
                                ("pgt", 0.5, -0.2), ("gc", None, 0.1)]:  # fmt: skip
        for seed in range(3):
            runs.append(_run(len(runs), method, alpha, seed, 70.2 + bump + rng.normal(0, 0.1)))
    runs.append(_run(len(runs), "ls", None, 0, 70.0, label_smoothing=0.1))
    runs.append(_run(len(runs), "pgt", 0.25, 9, 1.0, status=RunStatus.failed, error="boom"))
    store = Store(f"sqlite:///{d / 'results.db'}")
    with store.session() as s:
        s.add_all(runs)
    store.dispose()
    assert main(["--results-dir", str(d), "--out", str(d / "report")]) == 0  # default formats
    return d / "report"


class _Counter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.imgs: list[str] = []
        self.headers: list[str] = []
        self._th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables += 1
        elif tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")
        self._th = tag == "th"

    def handle_data(self, data: str) -> None:
        if self._th:
            self.headers.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._th = False


def _parse(html: str) -> _Counter:
    c = _Counter()
    c.feed(html)
    return c


def _chromium(exe: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def test_report_html_is_self_contained(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    page = _parse(html)
    assert page.tables == 4  # Tables 1-3 and the excluded runs
    # no external resources: every src / href is a data: URI or an in-page anchor
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:", "#")), attr
    assert "<link" not in html and "@import" not in html and "url(" not in html
    # the paper's Table 1 row (ImageNet resnet18 cosine, baseline and PGT alpha 0.25)
    for col in ("paper train", "paper test", "Δ test vs paper"):
        assert col in page.headers
    assert "70.208" in html and "70.298" in html  # the paper's test top-1 of those rows
    csv = (report_dir / "table1_baseline_vs_pgt.csv").read_text()
    assert csv.splitlines()[0].endswith(",paper,diff_vs_paper,verdict")
    # figures: analysis.plots draws the alpha grid from PGT at 3 alphas x 3 seeds
    assert "figures unavailable" not in html
    assert len(page.imgs) >= 1
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("<figcaption>") == len(page.imgs)


def test_report_html_in_headless_chromium(chromium: str, report_dir: Path, tmp_path: Path) -> None:
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    n_imgs = len(_parse(html).imgs)
    probe = tmp_path / "report_probe.html"
    probe.write_text(html.replace("</body>", PROBE + "\n</body>", 1), encoding="utf-8")

    proc = _chromium(chromium, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body is not None, proc.stdout[:2000]
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert data.get("probe") == "done", (data, proc.stderr[-2000:])

    heights = [float(h) for h in data["table-heights"].split(",") if h]
    rows = [int(n) for n in data["table-rows"].split(",") if n]
    assert len(heights) == 4 and all(h > 0 for h in heights), heights  # every table shown
    assert all(n >= 2 for n in rows), rows  # a header and at least one row each
    widths = [int(w) for w in data["img-widths"].split(",") if w]
    assert len(widths) == n_imgs >= 1
    assert all(w > 0 for w in widths), widths  # every image loaded and decoded

    shot = tmp_path / "report.png"
    proc = _chromium(chromium, f"--screenshot={shot}", "--window-size=1400,3000",
                     probe.as_uri())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, report_dir / "report_screenshot.png")


def test_paper_rows_match_tables_2_and_3() -> None:
    from analysis.paper import annotate, paper_rows
    from analysis.render import csv_table, markdown
    from analysis.stats import Summary
    from analysis.tables import Excluded, Row, Table

    assert len(paper_rows("table1_baseline_vs_pgt")) == 14  # package data via importlib
    s = {"train_acc": Summary(2, 79.0, 0.1), "test_acc": Summary(2, 76.0, 0.1),
         "gap": Summary(2, 3.0, 0.1)}  # fmt: skip
    k3 = {"data": "imagenet", "model": "resnet50", "epochs": 90, "batch_size": 256,
          "schedule": "cosine", "label_smoothing": 0.1, "alpha": 0.3}  # fmt: skip
    t3 = Table("table3_ablation", "Table 3", list(k3), list(s), False,
               [Row(k3, True, s), Row({**k3, "data": "cifar10"}, True, s)])  # fmt: skip
    k2 = {"data": "imagenet", "model": "resnet18_nobn", "epochs": 90, "schedule": "step",
          "batch_size": 256, "method": "agc", "alpha": None}  # fmt: skip
    t2 = Table("table2_batch_size", "Table 2", list(k2), ["train_acc", "test_acc"], True,
               [Row(k2, True, dict(s))])  # fmt: skip
    a3, a2 = annotate([t3, t2])
    assert a3.paper[0] is not None and a3.paper[0].test_acc == 76.968  # row 6 of the paper
    assert a3.paper[1] is None  # not ImageNet
    assert a2.paper[0] is not None and a2.paper[0].test_acc == 67.298
    lines = csv_table(a3).splitlines()
    assert lines[0].endswith(",paper,diff_vs_paper,verdict")
    test_line = next(x for x in lines if ",test_acc," in x and x.startswith("imagenet"))
    assert test_line.split(",")[-3:] == ["76.968", repr(76.0 - 76.968), ""]  # no verdict
    md = markdown([a3, a2], Excluded([], 0))
    assert "| paper train | paper test | Δ test vs paper |" in md and "| -0.97 |" in md


def test_report_without_plots_module(report_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Without analysis.plots the HTML still has every table and says so."""
    import sys

    monkeypatch.setitem(sys.modules, "analysis.plots", None)  # import raises ImportError
    db = report_dir.parent / "results.db"
    out = tmp_path / "o"
    assert main(["--store-url", f"sqlite:///{db}", "--formats", "html", "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert _parse(html).tables == 4 and "figures unavailable" in html and "<img" not in html
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]

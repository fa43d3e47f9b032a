"""The fairness report: fairness.json's content and report.html, one self-contained page."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_helpers import SITES, THRESHOLD, write_run

import server.report_page as report_page
from server.fairness import read_counts, report_of_round
from server.report import FAIRNESS_FILE, REPORT_FILE, privacy_spent, write_report

pytestmark = pytest.mark.timeout(120)

HOSTILE = '<img src=x onerror="alert(1)">&site'


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text under each section id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.sections: dict[str, list[str]] = {}
        self._section: str | None = None
        self.rows: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "section":
            self._section = attributes.get("id") or ""
            self.sections[self._section] = []
        if tag == "tr" and self._section is not None:
            self.rows[self._section] = self.rows.get(self._section, 0) + 1

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.sections[self._section].append(data)

    def text(self, section: str) -> str:
        return " ".join(self.sections[section])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def clear_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sites in the clear, DP-SGD, min-cell-count 10: age-band=60-69 is small."""
    run = write_run(tmp_path_factory.mktemp("report") / "run", dp="sample")
    write_report(run)
    return run


def test_the_page_is_self_contained(clear_run):
    # Execute
    page = _parse(clear_run / REPORT_FILE)
    text = (clear_run / REPORT_FILE).read_text()

    # Assert: no script, no style sheet or image from anywhere; plots are inline SVG
    names = [tag for tag, _ in page.tags]
    assert "script" not in names and "link" not in names and "iframe" not in names
    for tag, attributes in page.tags:
        for key in ("src", "href", "xlink:href"):
            value = attributes.get(key)
            if value is not None:
                assert value.startswith(("#", "data:")), (tag, key, value)
        if tag == "img":
            assert (attributes.get("src") or "").startswith("data:image/")
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', ""
    )
    assert "https://" not in text
    # gaps over rounds; ROC, calibration and AUC over rounds for sex and age-band; AUC and
    # loss per site; epsilon per site
    assert names.count("svg") == 10


def test_the_page_has_every_section_and_table(clear_run):
    # Execute
    page = _parse(clear_run / REPORT_FILE)
    body = json.loads((clear_run / FAIRNESS_FILE).read_text())

    # Assert: sections in order of reading
    assert list(page.sections) == [
        "run",
        "left-out",
        "gaps",
        "family-sex",
        "family-age-band",
        "sites",
        "privacy",
        "suppressed",
        "method",
    ]
    run = page.text("run")
    assert "completed" in run and "2 of 2" in run and "0.50" in run and "sample" in run
    # sex: header + M + F in the group table; one row per breakdown in the gaps tables
    sex = body["final"]["families"][0]["classes"]["1"]
    assert [g["cell"] for g in sex["groups"]] == ["sex=M", "sex=F"]
    assert page.rows["family-sex"] == 3
    female = sex["groups"][1]
    assert f"{female['sensitivity']['value']:.3f}" in page.text("family-sex")
    low, high = female["sensitivity"]["low"], female["sensitivity"]["high"]
    assert f"{low:.2f}–{high:.2f}" in page.text("family-sex")
    gap = sex["gaps"]["equal-opportunity-difference"]
    assert f"{gap:.3f}" in page.text("gaps")
    assert "ROC by sex" in page.text("family-sex") and "Calibration by sex" in page.text(
        "family-sex"
    )
    # per-site table: every site, privacy table: every site's epsilon after round 2
    for site in SITES:
        assert site in page.text("sites") and site in page.text("privacy")
    assert "1.000" in page.text("privacy")  # 0.5 per round, cumulative


def test_suppressed_cells_are_listed_by_name(clear_run):
    page = _parse(clear_run / REPORT_FILE)
    body = json.loads((clear_run / FAIRNESS_FILE).read_text())

    suppressed = body["final"]["suppressed"]
    assert "age-band=60-69" in suppressed  # ~10% of 40..80 patients per site, under 10
    for label in suppressed:
        assert label in page.text("suppressed")
    assert f"{len(suppressed)} subgroup cell(s)" in page.text("left-out")


def test_the_planted_difference_is_reported(clear_run):
    body = json.loads((clear_run / FAIRNESS_FILE).read_text())

    groups = {g["cell"]: g for g in body["final"]["families"][0]["classes"]["1"]["groups"]}
    assert groups["sex=F"]["sensitivity"]["value"] < groups["sex=M"]["sensitivity"]["value"]
    assert groups["sex=F"]["auc"]["value"] < groups["sex=M"]["auc"]["value"]
    assert body["final"]["families"][0]["classes"]["1"]["worst"]["auc"]["cell"] == "sex=F"


def test_fairness_json_holds_the_run_privacy_and_sites(clear_run):
    # Execute
    body = json.loads((clear_run / FAIRNESS_FILE).read_text())

    # Assert: the last evaluation's full report, as server.fairness computes it
    assert body["final"] == json.loads(json.dumps(report_of_round(read_counts(clear_run)[-1])))
    assert [r["round"] for r in body["rounds"]] == [1, 2]
    assert set(body["rounds"][0]["gaps"]) == {"sex", "age-band"}
    assert body["run"] | {"started": None} == {
        "run": "run",
        "status": "completed",
        "reason": "",
        "rounds-completed": 2,
        "num-server-rounds": 2,
        "evaluated-round": 2,
        "threshold": THRESHOLD,
        "dp": "sample",
        "secure-aggregation": False,
        "started": None,
        "model": "cnn",
        "strategy": "fedavg",
        "study-id": "study",
        "target-epsilon": 8.0,
        "fairness-attributes": "sex,age-band",
        "fairness-intersections": "",
    }
    privacy = body["privacy"]
    assert {s: p["epsilon"] for s, p in privacy["sites"].items()} == dict.fromkeys(SITES, 1.0)
    assert privacy["series"]["site-2"] == [[1, 0.5], [2, 1.0]]
    performance = body["site-performance"]
    assert [p["round"] for p in performance["sites"]["site-1"]] == [1, 2]
    assert performance["sites"]["site-2"][1]["auc"] == pytest.approx(0.71)
    assert [p["auc"] for p in performance["pooled"]] == pytest.approx([0.65, 0.7])
    assert performance["notes"] == ["computed from noised evaluation counts (DP)"]
    assert set(body["final"]["per-site"]["sites"]) == set(SITES)
    assert [r.split(":")[0] for r in body["left-out"]] == ["exact counts"]  # DP noise


def test_a_secure_run_says_what_it_left_out(tmp_path):
    # Prepare: SecAgg+ with client-level DP: no per-site vector, no per-site evaluation
    run = write_run(tmp_path / "secure", dp="client", secure=True)

    # Execute
    files = write_report(run)

    # Assert
    body = json.loads(files.fairness.read_text())
    assert body["final"]["per-site"] == {}
    assert body["site-performance"]["sites"] == {}
    assert [p["round"] for p in body["site-performance"]["pooled"]] == [0, 1]
    assert {s: p["epsilon"] for s, p in body["privacy"]["sites"].items()} == pytest.approx(
        dict.fromkeys(SITES, 1.6)
    )
    assert "client-level, planned" in body["privacy"]["sites"]["site-1"]["kind"]
    reasons = " ".join(body["left-out"])
    assert "per-site metrics" in reasons and "per-site performance" in reasons
    assert "under secure aggregation" in reasons and "under DP" in reasons
    box = _parse(files.html).text("left-out")
    assert "under secure aggregation the coordinator receives only the sum" in box
    assert "noise" in box


def test_a_multiclass_run_is_reported_per_class(tmp_path):
    # Prepare: three classes, reported one-vs-rest
    run = write_run(tmp_path / "multi", classes=3)

    # Execute
    files = write_report(run)

    # Assert: a table, ROC and calibration per class for each breakdown, gaps per class
    body = json.loads(files.fairness.read_text())
    assert body["final"]["classes"] == [0, 1, 2]
    page = _parse(files.html)
    sex = page.text("family-sex")
    for k in ("0", "1", "2"):
        assert f"class {k} (one-vs-rest)" in sex and f"ROC by sex, class {k}" in sex
        gap = body["final"]["families"][0]["classes"][k]["gaps"]["equalized-odds-difference"]
        assert f"{gap:.3f}" in page.text("gaps")
    assert "sex, class 2" in page.text("gaps")
    assert page.rows["family-sex"] == 3 * 3  # header, M and F, for each class


@pytest.mark.parametrize(
    ("dp", "secure", "train", "expected", "left_out"),
    [
        ("off", False, {"sites": {"a": {"num-examples": 3}}}, {}, []),
        ("sample", False, {"sites": {"a": {"epsilon": 0.4, "delta": 1e-5}}}, {"a": 0.4}, []),
        ("sample", True, {"sites": {}}, {}, ["under secure aggregation"]),
        (
            "client",
            True,
            {"sites": {}, "secure-aggregation": {"client-level-epsilon": 2.5}},
            {"a": 2.5, "b": 2.5},
            [],
        ),
        ("sample", False, {"sites": {}}, {}, ["no DP round completed"]),
    ],
)
def test_privacy_spent_per_site(dp, secure, train, expected, left_out):
    records = [{"round": 1, "train": train}]

    spent = privacy_spent(records, dp=dp, secure_aggregation=secure, sites=["a", "b"])

    assert {s: p["epsilon"] for s, p in spent["sites"].items()} == expected
    assert len(spent["left-out"]) == len(left_out)
    for reason, fragment in zip(spent["left-out"], left_out, strict=True):
        assert fragment in reason


def test_a_hostile_site_name_is_escaped_everywhere(tmp_path):
    # Prepare: a site whose name is markup
    run = write_run(tmp_path / "hostile", sites={"site-1": 60, HOSTILE: 60})

    # Execute
    files = write_report(run)

    # Assert: the name appears only escaped, in the tables and in the plots' legends
    text = files.html.read_text()
    assert HOSTILE not in text and "<img" not in text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;site" in text  # tables
    assert '&lt;img src=x onerror="alert(1)"&gt;&amp;site</text>' in text  # SVG legend text
    page = _parse(files.html)
    assert HOSTILE in page.text("sites")
    assert not [tag for tag, attributes in page.tags if tag == "img" or "onerror" in attributes]


def test_the_report_is_the_same_when_regenerated(clear_run, tmp_path):
    first = (clear_run / REPORT_FILE).read_bytes()

    files = write_report(clear_run)

    assert files.html.read_bytes() == first


def test_a_run_without_counts_has_no_report(tmp_path):
    run = write_run(tmp_path / "bare", counts=False)

    assert write_report(run) is None
    assert not (run / FAIRNESS_FILE).exists() and not (run / REPORT_FILE).exists()


def test_a_plot_that_fails_leaves_a_note_not_a_broken_page(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report_page, "roc_svg", broken)
    run = write_run(tmp_path / "run")

    files = write_report(run)

    text = files.html.read_text()
    assert "plot not drawn: no fonts" in text
    assert "Calibration by sex" in text  # the other plots are still there


@pytest.mark.timeout(60)
def test_importing_the_report_does_not_load_matplotlib():
    code = "import sys, server.report; assert 'matplotlib' not in sys.modules, 'loaded'"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False
    )

    assert result.returncode == 0, result.stderr

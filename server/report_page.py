"""``report.html``: the fairness report as one self-contained page.

No script, no request to the network: the style sheet is inline and every plot is an inline
``<svg>`` (:mod:`server.report_plots`). Every piece of text from the run (site names, cell
names, configuration strings, reasons) goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from server.report_plots import Curve, curves_svg, reliability_svg, roc_svg

__all__ = ["render_page"]

log = logging.getLogger(__name__)

RATE_COLUMNS = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("fpr", "FPR"),
    ("ppv", "PPV"),
    ("selection-rate", "selection rate"),
    ("prevalence", "prevalence"),
)
GAP = "equal-opportunity-difference"
GAP_COLUMNS = (
    ("demographic-parity-difference", "demographic parity difference"),
    ("demographic-parity-ratio", "demographic parity ratio"),
    ("equalized-odds-difference", "equalized odds difference"),
    ("equal-opportunity-difference", "equal opportunity difference"),
)
SITE_COLUMNS = ("auc", "sensitivity", "specificity", "accuracy", "loss")

STYLE = """
:root { --ink: #1f2430; --muted: #5c6370; --line: #dde1e7; --accent: #2a6f97;
        --warn: #9a3412; --warn-bg: #fff7ed; --stripe: #f6f8fa; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; color: var(--accent); }
p.lede { color: var(--muted); margin-top: 0; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); text-align: right;
         vertical-align: top; }
th { background: var(--stripe); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fbfcfd; }
td small { display: block; color: var(--muted); font-size: 11px; white-space: nowrap; }
td.worst { color: var(--warn); font-weight: 600; }
table.facts td, table.facts th { text-align: left; }
.box { border-left: 5px solid var(--warn); background: var(--warn-bg);
       padding: 10px 16px; margin: 18px 0; border-radius: 4px; }
.box h2 { border: 0; margin: 4px 0 6px; color: var(--warn); }
.plots { display: flex; flex-wrap: wrap; gap: 18px; }
.plots figure { margin: 0; flex: 1 1 460px; max-width: 560px; }
.plots svg { width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; }
.note { color: var(--muted); font-size: 12.5px; }
ul.cells { columns: 3; font-family: ui-monospace, Menlo, Consolas, monospace;
           font-size: 12.5px; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return "–"
    return f"{value:.{digits}f}"


def _estimate(entry: Mapping[str, Any] | None, *, extra: str = "") -> str:
    """A value with its 95% interval under it."""
    if not entry or entry.get("value") is None:
        return "–"
    ci = f"{_num(entry.get('low'), 2)}–{_num(entry.get('high'), 2)}"
    return f"{_num(entry['value'])}<small>{ci}{extra}</small>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "") -> str:
    """A table of already escaped cells (``<td class="worst">...`` passes through as is)."""
    attr = f' class="{cls}"' if cls else ""
    top = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table{attr}><thead><tr>{top}</tr></thead><tbody>{body}</tbody></table>"


def _figure(draw: Callable[[], str], caption: str) -> str:
    """A plot in a ``<figure>``; a plot that cannot be drawn leaves a note, not a broken page."""
    try:
        svg = draw()
    except Exception as exc:  # a figure is cosmetic: the tables beside it carry the numbers
        log.warning("fairness report: a plot could not be drawn (%s)", exc)
        return f'<p class="note">plot not drawn: {_e(exc)}</p>'
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _class_title(report: Mapping[str, Any], k: str) -> str:
    if int(report["num-classes"]) == 2:
        return f"positive class {k}"
    return f"class {k} (one-vs-rest)"


def _header(body: Mapping[str, Any]) -> str:
    run, final = body["run"], body["final"]
    rounds = f"{run.get('rounds-completed')} of {run.get('num-server-rounds')}"
    secure = "on (SecAgg+): the coordinator sees only sums" if run["secure-aggregation"] else "off"
    facts = [
        ("status", str(run["status"]) + (f" ({run['reason']})" if run.get("reason") else "")),
        ("rounds completed", rounds),
        ("model evaluated", f"round {run['evaluated-round']}"),
        ("decision threshold", _num(run["threshold"], 2)),
        ("differential privacy", str(run["dp"])),
        ("secure aggregation", secure),
    ]
    facts += [
        (key, str(run[key]))
        for key in (
            "target-epsilon",
            "model",
            "strategy",
            "study-id",
            "fairness-attributes",
            "fairness-intersections",
            "started",
        )
        if run.get(key) not in (None, "")
    ]
    facts.append(("cells suppressed", str(len(final["suppressed"]))))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f'<section id="run"><h2>Run</h2><table class="facts">{rows}</table></section>'


def _left_out(body: Mapping[str, Any]) -> str:
    items = [_e(reason) for reason in body["left-out"]]
    count = len(body["final"]["suppressed"])
    if count:
        items.append(
            f"{count} subgroup cell(s): below a site's minimum cell count, or left out with "
            'such a cell so that no total gives it away (<a href="#suppressed">listed below</a>)'
        )
    if not items:
        items.append("nothing: every view of this report could be computed")
    lis = "".join(f"<li>{i}</li>" for i in items)
    return f'<section class="box" id="left-out"><h2>Left out and why</h2><ul>{lis}</ul></section>'


def _headline(body: Mapping[str, Any]) -> str:
    final = body["final"]
    rows = []
    for family in final["families"]:
        for k, part in family["classes"].items():
            name = family["name"] if len(final["classes"]) == 1 else f"{family['name']}, class {k}"
            worst = part["worst"]
            rows.append(
                [_e(name), str(len(part["groups"]))]
                + [_num(part["gaps"][g]) for g, _ in GAP_COLUMNS]
                + [
                    f"{_num(worst[m]['value'])}<small>{_e(worst[m]['cell'])}</small>"
                    if m in worst
                    else "–"
                    for m in ("auc", "sensitivity")
                ]
            )
    head = (
        ["breakdown", "groups"] + [t for _, t in GAP_COLUMNS] + ["worst AUC", "worst sensitivity"]
    )
    return (
        '<section id="gaps"><h2>Gaps and worst groups</h2>'
        '<p class="note">Gaps over the groups with data, with fairlearn\'s definitions: '
        "demographic parity difference and ratio of selection rates, equalized odds difference "
        "(the larger of the sensitivity and FPR ranges), equal opportunity difference "
        "(sensitivity range). The worst group of each metric is marked in the tables below.</p>"
        + _table(head, rows)
        + _gaps_over_rounds(body)
        + "</section>"
    )


def _gaps_over_rounds(body: Mapping[str, Any]) -> str:
    """Equal opportunity difference of every breakdown (and class) over the evaluations."""
    rounds = body["rounds"]
    if len(rounds) < 2:
        return ""
    final = body["final"]
    curves: list[Curve] = []
    for family in final["families"]:
        for k in family["classes"]:
            label = family["name"] if len(final["classes"]) == 1 else f"{family['name']} [{k}]"
            points = [
                [r["round"], value]
                for r in rounds
                if (value := r["gaps"].get(family["name"], {}).get(k, {}).get(GAP)) is not None
            ]
            if points:
                curves.append((label, points))
    if not curves:
        return ""
    figure = _figure(
        partial(curves_svg, "Equal opportunity difference over rounds", curves, ylabel="gap"),
        "sensitivity range between the groups of each breakdown, by the round of the model",
    )
    return f'<div class="plots">{figure}</div>'


def _over_rounds(body: Mapping[str, Any], family: str, k: str) -> str:
    """Each group's AUC over the evaluations (a figure), or '' with fewer than two."""
    by_cell: dict[str, list[list[float]]] = {}
    for r in body["rounds"]:
        for cell, value in (r.get("auc", {}).get(family, {}).get(k) or {}).items():
            if value is not None:
                by_cell.setdefault(cell, []).append([r["round"], value])
    curves: list[Curve] = list(by_cell.items())
    if len(body["rounds"]) < 2 or not curves:
        return ""
    return _figure(
        partial(curves_svg, f"AUC by {family} over rounds", curves, ylabel="AUC"),
        "each group's AUC, by the round of the model",
    )


def _highlights(groups: Sequence[Mapping[str, Any]], worst: Mapping[str, Any]) -> dict[str, Any]:
    """The worst groups worth marking: where the groups' values differ at all."""
    out = {}
    for metric, entry in worst.items():
        values = set()
        for g in groups:
            value = g[metric].get("value") if isinstance(g[metric], Mapping) else g[metric]
            if value is not None:
                values.add(round(float(value), 9))
        if len(values) > 1:
            out[metric] = entry
    return out


def _group_row(
    group: Mapping[str, Any], worst: Mapping[str, Any], *, left_out: str = "site(s) left it out"
) -> list[str]:
    """A subgroup's row; ``left_out`` names what its suppressed count counts."""

    def cell(metric: str, text: str) -> str:
        hit = metric in worst and worst[metric]["cell"] == group["cell"]
        return f'<td class="worst">{text}</td>' if hit else text

    auc = group["auc"]
    binning = f" ±{_num(auc.get('binning-error'), 3)} bins" if auc.get("value") is not None else ""
    suppressed = group["suppressed-at-sites"]
    return (
        [
            _e(group["cell"]),
            str(group["n"]) + (f"<small>{suppressed} {left_out}</small>" if suppressed else ""),
        ]
        + [cell("auc", _estimate(auc, extra=binning))]
        + [cell(m, _estimate(group[m])) for m, _ in RATE_COLUMNS]
        + [cell("ece", _num(group["ece"]))]
    )


def _plots(family: str, title: str, groups: Sequence[Mapping[str, Any]], extra: str) -> str:
    roc: list[Curve] = [
        (f"{g['cell']} (AUC {_num(g['auc']['value'], 2)}, n={g['n']})", g["roc"])
        for g in groups
        if g["roc"]
    ]
    calibration: list[Curve] = [
        (f"{g['cell']} (ECE {_num(g['ece'], 3)})", g["reliability"])
        for g in groups
        if g["reliability"]
    ]
    figures = []
    if roc:
        figures.append(_figure(lambda: roc_svg(f"ROC by {family}, {title}", roc), "ROC curves"))
    if calibration:
        figures.append(
            _figure(
                lambda: reliability_svg(f"Calibration by {family}, {title}", calibration),
                "Reliability: observed rate against mean score, 10 score groups",
            )
        )
    if extra:
        figures.append(extra)
    if not figures:
        return '<p class="note">no group has both positive and negative cases to plot.</p>'
    return f'<div class="plots">{"".join(figures)}</div>'


def _family(body: Mapping[str, Any], family: Mapping[str, Any]) -> str:
    report = body["final"]
    name = family["name"]
    parts = [f'<section id="family-{_e(name)}"><h2>By {_e(name)}</h2>']
    head = ["group", "n", "AUC", *(t for _, t in RATE_COLUMNS), "ECE"]
    for k, part in family["classes"].items():
        title = _class_title(report, k)
        parts.append(f"<h3>{_e(title)}</h3>")
        if not part["groups"]:
            parts.append('<p class="note">no group of this breakdown was published.</p>')
            continue
        marked = _highlights(part["groups"], part["worst"])
        parts.append(_table(head, [_group_row(g, marked) for g in part["groups"]]))
        parts.append(_plots(name, title, part["groups"], _over_rounds(body, name, k)))
    if family["suppressed"]:
        cells = ", ".join(f"<code>{_e(c)}</code>" for c in family["suppressed"])
        parts.append(f'<p class="note">suppressed at one or more sites: {cells}</p>')
    parts.append("</section>")
    return "".join(parts)


def _sites(body: Mapping[str, Any]) -> str:
    performance = body["site-performance"]
    parts = ['<section id="sites"><h2>Per-site performance over rounds</h2>']
    sites = performance["sites"]
    pooled = performance["pooled"]
    if not sites and not pooled:
        parts.append('<p class="note">no evaluation was recorded.</p>')
    else:
        figures = []
        for metric, label in (("auc", "AUC"), ("loss", "loss")):
            curves: list[Curve] = [
                (site, [[p["round"], p[metric]] for p in points if metric in p])
                for site, points in sites.items()
            ]
            line = [[p["round"], p[metric]] for p in pooled if metric in p]
            if not line and not any(points for _, points in curves):
                continue  # e.g. the loss, which sites withhold under DP
            reference: Curve | None = ("all sites (pooled)", line) if line else None
            figures.append(
                _figure(
                    partial(
                        curves_svg,
                        f"{label} per site over rounds",
                        curves,
                        ylabel=label,
                        reference=reference,
                    ),
                    f"{label} of each site's validation split, by the round of the model",
                )
            )
        parts.append(f'<div class="plots">{"".join(figures)}</div>')
    if sites:
        head = ["site", "model", "n", *SITE_COLUMNS]
        rows = [
            [_e(site), f"round {points[-1]['round']}", _num(points[-1].get("num-examples"), 0)]
            + [_num(points[-1].get(m)) for m in SITE_COLUMNS]
            for site, points in sites.items()
        ]
        parts.append("<h3>Each site at its last evaluation</h3>" + _table(head, rows))
    parts += [f'<p class="note">{_e(n)}</p>' for n in performance["notes"]]
    parts += [f'<p class="note">left out: {_e(r)}</p>' for r in performance["left-out"]]
    parts.append(_site_spread(body["final"]))
    parts.append("</section>")
    return "".join(parts)


def _site_spread(final: Mapping[str, Any]) -> str:
    per_site = final.get("per-site") or {}
    if not per_site.get("sites"):
        return ""
    parts = [
        "<h3>Spread across sites (from each site's subgroup counts)</h3>",
        '<p class="note">Each site\'s figures pool the cells of the first breakdown it '
        "published; cells a site suppressed are missing from its figures.</p>",
    ]
    head = ["site", "n", "AUC", *(t for _, t in RATE_COLUMNS), "ECE"]
    for k in (str(c) for c in final["classes"]):
        rows = [
            _group_row(entries[k], {}, left_out="cell(s) suppressed")
            for entries in per_site["sites"].values()
        ]
        spread = per_site["spread"][k]
        rows.append(
            ["<b>spread (max − min)</b>", ""]
            + [_num(spread.get("auc"))]
            + [_num(spread.get(m)) for m, _ in RATE_COLUMNS]
            + [_num(spread.get("ece"))]
        )
        if len(final["classes"]) > 1:
            parts.append(f"<p>class {_e(k)}</p>")
        parts.append(_table(head, rows))
    return "".join(parts)


def _privacy(body: Mapping[str, Any]) -> str:
    privacy = body["privacy"]
    parts = ['<section id="privacy"><h2>Privacy spent per site</h2>']
    if privacy["dp"] == "off":
        parts.append(
            '<p class="note">differential privacy was off: no epsilon was spent, and '
            "no count carries noise.</p>"
        )
    if privacy["sites"]:
        rows = [
            [
                _e(site),
                _num(s["epsilon"]),
                _e(f"{s['delta']:.2g}") if s["delta"] else "–",
                f"round {s['round']}",
                _e(s["kind"]),
            ]
            for site, s in privacy["sites"].items()
        ]
        parts.append(_table(["site", "epsilon", "delta", "after", "what it is"], rows))
        series = privacy["series"]
        if any(len(points) > 1 for points in series.values()):
            curves: list[Curve] = list(series.items())
            parts.append(
                '<div class="plots">'
                + _figure(
                    lambda: curves_svg("Epsilon spent per site", curves, ylabel="epsilon"),
                    "cumulative epsilon after each round",
                )
                + "</div>"
            )
    parts += [f'<p class="note">left out: {_e(r)}</p>' for r in privacy["left-out"]]
    parts.append("</section>")
    return "".join(parts)


def _suppressed(final: Mapping[str, Any]) -> str:
    parts = ['<section id="suppressed"><h2>Suppressed cells</h2>']
    if not final["suppressed"]:
        parts.append('<p class="note">no site suppressed any cell.</p>')
    for family in final["families"]:
        if not family["suppressed"]:
            continue
        published = {
            g["cell"]: g["suppressed-at-sites"]
            for part in family["classes"].values()
            for g in part["groups"]
        }
        items = "".join(
            f"<li>{_e(c)} <small>(partly: {published[c]} site(s) left it out)</small></li>"
            if c in published
            else f"<li>{_e(c)}</li>"
            for c in family["suppressed"]
        )
        parts.append(f'<h3>{_e(family["name"])}</h3><ul class="cells">{items}</ul>')
    parts.append(
        '<p class="note">A site zeroes and flags a cell below its own <code>min-cell-count</code>, '
        "and the smallest other cells of the same breakdown until the left-out cells add up to "
        "0 or to at least that count, so no suppressed count can be recovered from a total. "
        "A cell marked <i>partly</i> is reported above with the other sites' patients only.</p>"
        "</section>"
    )
    return "".join(parts)


METHOD = (
    '<section id="method"><h2>How these numbers are made</h2><p class="note">'
    "Every site sends integer counts per subgroup cell in one fixed layout (confusion counts at "
    "the decision threshold, score histograms of 100 bins per class); the coordinator adds them "
    "up and computes every figure here from the sums. Proportions carry Wilson 95% intervals, "
    "widened under DP by the noise the counts carry; AUC carries a Hanley–McNeil 95% interval "
    "and the largest error the binning of scores can cause (the ± under each AUC); ECE uses "
    "10 score groups. The worst group of each metric is highlighted.</p></section>"
)


def render_page(body: Mapping[str, Any]) -> str:
    """The HTML page of a report body (as :func:`server.report.build_fairness` returns)."""
    final = body["final"]
    title = f"fedrad fairness report · {body['run']['run']}"
    sections = [
        f'<h1>Fairness report</h1><p class="lede">run <code>{_e(body["run"]["run"])}</code>: '
        f"the global model of round {_e(final['round'])}, per patient subgroup, from the "
        "sites' aggregated counts only.</p>",
        _header(body),
        _left_out(body),
        _headline(body),
        *(_family(body, f) for f in final["families"]),
        _sites(body),
        _privacy(body),
        _suppressed(final),
        METHOD,
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )

"""``report.html``: one self-contained page per work folder (figures embedded as base64 PNGs, no script, no
font or style fetched), plus the same figures as PNGs in ``<workdir>/report/``.

:func:`build_report` analyses the folder (:func:`~weakclip.report.analysis.analyse`), runs the regression
checks and writes the page: warnings, the stage table with each stage's settings and time, the per-class
chart and table, the gallery (with ground truth: the images whose pseudo mask gained most and lost most
against their seed; without: a sample with each mask's class shares) and the training curves.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weakclip.report import REPORT_DIR, REPORT_HTML
from weakclip.report.analysis import SET_TITLES, analyse
from weakclip.report.checks import Regression, find_regressions

GALLERY_EACH = 4  # images that gained most, and that lost most
SAMPLE_NO_GT = 6
TILE_HEIGHT = 128

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.worse { background: #fde0dd; } td.better { background: #e5f5e0; }
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 8px 14px; border-radius: 4px; }
.warn li { margin: 2px 0; } .ok { color: #2b7a0b; }
.status-complete { color: #2b7a0b; } .status-partial { color: #b06000; } .status-not { color: #999; }
figure { margin: 0; display: inline-block; vertical-align: top; }
img.fig { max-width: 100%; border: 1px solid #eee; }
.gallery td { text-align: center; border: none; padding: 2px 4px; } .gallery img { display: block; }
.gallery .cap { font-size: 0.8em; color: #444; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #999; margin: 0 4px 0 10px;
          vertical-align: middle; }
pre { background: #f8f8f8; padding: 8px; font-size: 0.8em; max-height: 320px; overflow: auto; }
details summary { cursor: pointer; color: #245; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _img(data: bytes, alt: str, cls: str = "") -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" alt="{_e(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _fig(path: Path, alt: str) -> str:
    return f"<figure>{_img(path.read_bytes(), alt, 'fig')}</figure>"


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


# ---------------------------------------------------------------------- sections
def _stage_rows(a: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per line of the stage table, for the stages of the run's method in order (the pseudo-mask stage
    gives two: before and after CRF, when it holds both)."""
    stages, sets, final = a["stages"], a["sets"], a["final"]
    skip = ("iter", "lr", "seconds", "images_per_s")

    def rec(stage: str) -> dict[str, Any]:
        return stages[stage]["record"] or {}

    def miou(name: str, stage: str, key: str) -> float | None:
        if name in sets and sets[name].get("miou") is not None:
            return sets[name]["miou"]
        return rec(stage).get("metrics", {}).get(key)

    rows: list[dict[str, Any]] = []
    for stage, facts in stages.items():
        title = facts.get("title") or stage
        metrics = rec(stage).get("metrics", {})
        seconds = rec(stage).get("seconds", metrics.get("seconds"))
        if stage == "seeds":
            notes = (f"confident pixels only: {_pct(metrics.get('seeds_miou_confident'))}%; coverage "
                     f"{_pct(metrics.get('coverage'))}%") if metrics.get("coverage") is not None else ""
            rows.append({"name": title, "stage": stage, "miou": miou("seeds", stage, "seeds_miou"),
                         "images": sets.get("seeds", {}).get("images", metrics.get("images")), "notes": notes,
                         "seconds": seconds})
        elif stage == "pseudo_masks":
            before = miou("pseudo_no_crf", stage, "pseudo_miou_no_crf")
            settings = rec(stage).get("settings") or {}
            no_crf = settings.get("infer.crf") is False or settings.get("crf") == "none"
            if "pseudo_no_crf" in sets or not no_crf:  # a row before the CRF where the stage has a CRF
                rows.append({"name": f"{title} before CRF", "stage": stage, "miou": before,
                             "images": sets.get("pseudo_no_crf", {}).get("images"), "notes": "",
                             "seconds": None})
            rows.append({"name": title, "stage": stage, "miou": miou("pseudo", stage, "pseudo_miou"),
                         "images": sets.get("pseudo", {}).get("images"), "notes": "", "seconds": seconds})
        elif stage == a.get("final_stage") or stage in ("retrain", "evaluate"):
            scored = final if stage == a.get("final_stage") else None
            key = "final_miou" if stage == "retrain" else "network_val_miou"
            is_final = stage == a.get("final_stage")
            rows.append({"name": "final network (val)" if is_final else title, "stage": stage,
                         "miou": (scored or {}).get("miou", metrics.get(key)),
                         "images": (scored or {}).get("images", metrics.get("val_images")),
                         "notes": title if is_final else "", "seconds": seconds})
        else:  # a training stage: its last losses
            losses = metrics.get("final_losses") or {}
            loss_text = ", ".join(f"{k} {v:.3f}" for k, v in losses.items()
                                  if k not in skip and isinstance(v, (int, float)))
            rows.append({"name": title, "stage": stage, "miou": None, "images": None,
                         "notes": f"final losses: {loss_text}" if loss_text else "", "seconds": seconds})
    return rows


def _settings_html(a: dict[str, Any], stage: str) -> str:
    record = a["stages"][stage]["record"] or {}
    settings = dict(record.get("settings") or {})
    parts = []
    if settings:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in settings.items())
        parts.append(f"<table>{rows}</table>")
    config = Path(a["workdir"]) / stage / "config.yaml"
    if config.is_file():
        parts.append(f"<pre>{_e(config.read_text(encoding='utf-8', errors='replace'))}</pre>")
    if not parts:
        return ""
    return f"<details><summary>settings</summary>{''.join(parts)}</details>"


def _stage_table(a: dict[str, Any]) -> str:
    head = ("<tr><th>stage</th><th>status</th><th>mIoU %</th><th>images</th><th>time</th><th>notes</th>"
            "<th>settings</th></tr>")
    rows = []
    table = _stage_rows(a)
    for k, row in enumerate(table):
        status = a["stages"][row["stage"]]["status"]
        cls = "status-" + status.split()[0]
        last_of_stage = k + 1 == len(table) or table[k + 1]["stage"] != row["stage"]
        settings = _settings_html(a, row["stage"]) if last_of_stage else ""
        rows.append(f"<tr><td>{_e(row['name'])}</td><td class='{cls}'>{_e(status)}</td>"
                    f"<td class='num'>{_pct(row['miou'])}</td><td class='num'>{_e(row['images'] or '-')}</td>"
                    f"<td class='num'>{_seconds(row['seconds'])}</td><td>{_e(row['notes'])}</td>"
                    f"<td>{settings}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class_table(classes: list[str], series: dict[str, dict]) -> str:
    names = list(series)
    head = "<tr><th rowspan=2>class</th>" + "".join(f"<th colspan=3>{_e(SET_TITLES.get(n, n))}</th>"
                                                    for n in names) + "</tr>"
    head += "<tr>" + "<th>IoU</th><th>FP</th><th>FN</th>" * len(names) + "</tr>"
    rows = []
    for c, name in enumerate(classes):
        cells = []
        previous = None
        for n in names:
            iou = series[n]["iou"][c]
            cls = "num"
            if previous is not None and iou is not None:
                cls += " worse" if iou < previous - 1e-9 else (" better" if iou > previous + 1e-9 else "")
            previous = iou if iou is not None else previous
            cells.append(f"<td class='{cls}'>{_pct(iou)}</td><td class='num'>{_pct(series[n]['fp'][c])}</td>"
                         f"<td class='num'>{_pct(series[n]['fn'][c])}</td>")
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _legend(classes: list[str]) -> str:
    from weakclip.data.classes import voc_palette

    pal = voc_palette(256)
    items = [f"<span class='swatch' style='background: rgb{tuple(int(v) for v in pal[c])}'></span>{_e(n)}"
             for c, n in enumerate(classes)]
    items.append("<span class='swatch' style='background: rgb(255, 255, 255)'></span>unsure (seeds)")
    return f"<p class='meta'>colours: {''.join(items)}</p>"


def _shares_text(shares: dict, classes: list[str]) -> str:
    items = sorted(((float(v), int(k)) for k, v in shares.items()), reverse=True)
    return ", ".join(f"{'unsure' if k == 255 else classes[k]} {100 * v:.0f}%" for v, k in items[:4])


def _gallery(a: dict[str, Any], dataset, log: Callable[[str], None]) -> str:
    """The gallery section's HTML (tiles drawn on the spot)."""
    from weakclip.data.io import read_label_png
    from weakclip.report.panels import png_bytes, tile

    sets, classes = a["sets"], a["classes"]
    seeds, pseudo = sets.get("seeds"), sets.get("pseudo")
    if not seeds and not pseudo:
        return "<p>No masks yet.</p>"
    index = {ident: i for i, ident in enumerate(dataset.ids)}
    groups: list[tuple[str, list[str]]] = []
    have_gt = a["has_gt"]
    if have_gt and seeds and pseudo:
        both = [i for i in pseudo["per_image"] if i in seeds["per_image"]
                and pseudo["per_image"][i].get("miou") is not None
                and seeds["per_image"][i].get("miou") is not None]
        delta = {i: pseudo["per_image"][i]["miou"] - seeds["per_image"][i]["miou"] for i in both}
        order = sorted(both, key=lambda i: (-delta[i], i))
        gained = order[:GALLERY_EACH]
        lost = [i for i in reversed(order) if i not in gained][:GALLERY_EACH]
        lost_title = ("lost most against the seeds" if any(delta[i] < 0 for i in lost)
                      else "gained least against the seeds (no image lost)")
        groups = [("gained most against the seeds", gained), (lost_title, lost)]
    else:
        pool = sorted(set((pseudo or seeds)["per_image"]))
        step = max(1, len(pool) // SAMPLE_NO_GT)
        groups = [("a sample of the training images", pool[::step][:SAMPLE_NO_GT])]

    columns = ["image"] + (["seed"] if seeds else []) + (["pseudo mask"] if pseudo else [])
    columns += ["ground truth"] if have_gt else []
    parts = []
    for title, ids in groups:
        rows = []
        for ident in ids:
            i = index.get(ident)
            if i is None:
                continue
            try:
                image = dataset.read_image(i)
                cells = [(tile(image, TILE_HEIGHT, False), ident)]
                for name, label in (("seeds", "seed"), ("pseudo", "pseudo mask")):
                    s = sets.get(name)
                    if not s:
                        continue
                    path = Path(s["folder"]) / f"{ident}.png"
                    mask = dataset.fit_label(i, read_label_png(path), path, label,
                                             expected_hw=image.shape[:2])
                    fact = s["per_image"].get(ident, {})
                    cap = (f"{label}: IoU {_pct(fact['miou'])}%" if fact.get("miou") is not None
                           else f"{label}: {_shares_text(fact.get('shares', {}), classes)}")
                    seed_iou = (seeds or {}).get("per_image", {}).get(ident, {}).get("miou")
                    if name == "pseudo" and fact.get("miou") is not None and seed_iou is not None:
                        cap += f" ({100 * (fact['miou'] - seed_iou):+.2f})"
                    cells.append((tile(mask, TILE_HEIGHT, True), cap))
                if have_gt:
                    gt = dataset.read_gt(i, image.shape[:2])
                    cells.append((tile(gt, TILE_HEIGHT, True), "ground truth"))
            except Exception as exc:  # a picture that cannot be drawn must not stop the report
                log(f"report page: gallery image {ident!r} skipped: {exc}")
                continue
            tds = "".join(f"<td>{_img(png_bytes(im), cap)}<div class='cap'>{_e(cap)}</div></td>"
                          for im, cap in cells)
            rows.append(f"<tr>{tds}</tr>")
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        parts.append(f"<h3>{_e(title)}</h3><table class='gallery'><tr>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def _warnings_html(warnings: list[Regression], notes: list[str]) -> str:
    out = []
    if warnings:
        items = "".join(f"<li>{_e(w.message)}</li>" for w in warnings)
        out.append(f"<div class='warn' id='warnings'><b>Warnings</b><ul>{items}</ul></div>")
    else:
        out.append("<p class='ok' id='warnings'>No stage made things worse; no class vanished.</p>")
    if notes:
        out.append("<ul class='meta'>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


# ---------------------------------------------------------------------- the page
def build_report(workdir: str | Path, log: Callable[[str], None] = print,
                 analysis: dict[str, Any] | None = None) -> Path:
    """Write ``<workdir>/report.html`` (and the figures in ``<workdir>/report/``); returns the page's path."""
    from weakclip.data.datasets import build_dataset
    from weakclip.data.io import jsonable, write_json_atomic, write_text_atomic
    from weakclip.report import plots

    a = analysis if analysis is not None else analyse(workdir, log=log)
    workdir = Path(a["workdir"])
    figures = workdir / REPORT_DIR
    warnings = find_regressions(a)
    classes = a["classes"] or []
    sets = a["sets"]
    body: list[str] = []
    run = a["run"]
    complete = all(s["status"] == "complete" for s in a["stages"].values())
    title = (a.get("method") or {}).get("title", "WeakCLIP")
    body.append(f"<h1>weakclip run report: {_e(title)}</h1><p class='meta'>method {_e(title)} · work folder "
                f"{_e(workdir)} · dataset: "
                f"{_e(run.get('kind') or '?')} at {_e(run.get('data_root') or '?')}, training split "
                f"{_e(run.get('train_split') or '?')}, val split {_e(run.get('val_split') or '-')} · "
                f"{'finished' if complete else 'partial run'} · "
                f"written {time.strftime('%Y-%m-%d %H:%M')}</p>")
    body.append(_warnings_html(warnings, a["notes"]))
    body.append("<h2>Stages</h2>")
    body.append(_stage_table(a))
    body.append("<p class='meta'>mIoU of the seeds (unsure pixels as background) and pseudo masks on the "
                "training split, of the final network on the val split. Time: the stage's last session.</p>")

    series = {n: sets[n] for n in ("seeds", "pseudo_no_crf", "pseudo") if sets.get(n, {}).get("iou")}
    if a["final"] and any(v is not None for v in a["final"]["iou"]):
        series["final"] = a["final"]
    body.append("<h2>Per class</h2>")
    if classes and series:
        chart = plots.plot_per_class(classes, series, SET_TITLES, figures / "per_class.png")
        body.append(_fig(chart, "per-class IoU, FP and FN"))
        body.append(_per_class_table(classes, series))
        body.append("<p class='meta'>IoU, FP and FN in percent of each class's union of prediction and "
                    "ground truth (they add up to 100). Green / red: better / worse than the column to the "
                    "left.</p>")
    elif classes and sets:
        pixels = {n: sets[n]["pixels"] for n in ("seeds", "pseudo") if n in sets}
        chart = plots.plot_shares(classes, pixels, SET_TITLES, figures / "shares.png")
        body.append(_fig(chart, "class pixel shares"))
    else:
        body.append("<p>Nothing scored yet.</p>")

    body.append("<h2>Gallery</h2>")
    if classes and sets:
        body.append(_legend(classes))
        r = a["run"]
        dataset = build_dataset(r["kind"], r["data_root"], split=r["train_split"], seed_dir=None,
                                image_orientation="exif")  # upright, every mask fitted to it
        body.append(_gallery(a, dataset, log))
    else:
        body.append("<p>No masks yet.</p>")

    body.append("<h2>Training curves</h2>")
    curves = []
    for stage, columns in a["curves"].items():
        stage_title = a["stages"].get(stage, {}).get("title") or stage
        if columns and columns.get("iter"):
            path = plots.plot_training(columns, stage_title, figures / f"training_{stage}.png")
            curves.append(_fig(path, f"{stage_title}: loss terms and learning rate"))
    body.append("".join(curves) if curves else "<p>No training log yet.</p>")
    logs = " · ".join(f"<a href='{s}/log.txt'>{s}</a>" for s in a["stages"]
                      if (workdir / s / "log.txt").is_file())
    body.append(f"<p class='meta'>Files: <a href='report.json'>report.json</a> · stage logs: {logs}</p>")

    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>weakclip report: "
            f"{_e(workdir.name)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    summary = {"warnings": [{"stage": w.stage, "message": w.message} for w in warnings], "classes": classes,
               "per_class": {n: {k: s.get(k) for k in ("miou", "iou", "fp", "fn", "images")}
                             for n, s in series.items()},
               "pixels": {n: s["pixels"] for n, s in sets.items()}}
    write_json_atomic(figures / "summary.json", jsonable(summary))
    return write_text_atomic(workdir / REPORT_HTML, page)


def image_ious(a: dict[str, Any], name: str) -> dict[str, float]:
    """Per-image mIoU of a mask set (images without a score left out)."""
    facts = (a["sets"].get(name) or {}).get("per_image", {})
    return {i: f["miou"] for i, f in facts.items() if f.get("miou") is not None}


"""Accuracy report of the streams and their fusions: printed table, report.md, report.json, confusion.png.

Numbers are rounded before they are written and everything is ordered explicitly, so the same
scores always give byte-identical files (they can be diffed between runs).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from core.atomic import write_atomic, write_json
from core.splits import ids_checksum

DIGITS = 6


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of videos whose label is among the k highest scores (ties broken by class index)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == labels[:, None], axis=1)))


def predictions(scores: np.ndarray) -> np.ndarray:
    return np.argmax(scores, axis=1)  # first maximum on ties: deterministic


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class's videos; NaN for a class with no videos."""
    pred = predictions(scores)
    acc = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            acc[c] = np.mean(pred[mask] == c)
    return acc


def metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top1, top5 and mean class accuracy (mean over classes that have videos)."""
    labels = np.asarray(labels, np.int64)
    pc = per_class_accuracy(scores, labels, num_classes)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5),
            "mean_class_acc": float(np.nanmean(pc)) if np.isfinite(pc).any() else float("nan")}


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), predictions(scores)), 1)
    return cm


def stream_wins(per_class: dict[str, np.ndarray], class_names: Sequence[str], k: int = 5) -> dict:
    """For each stream, the classes where it beats the best of the other streams by the most."""
    wins = {}
    for name, acc in per_class.items():
        others = np.nanmax(np.stack([a for n, a in per_class.items() if n != name]), axis=0)
        diff = acc - others
        idx = sorted((i for i in range(len(class_names)) if np.isfinite(diff[i]) and diff[i] > 0),
                     key=lambda i: (-diff[i], class_names[i]))[:k]
        wins[name] = [{"class": class_names[i], "accuracy": _r(acc[i]), "best_other": _r(others[i]),
                       "difference": _r(diff[i])} for i in idx]
    return wins


def _r(x: float) -> float | None:
    """Round for output; None (JSON null) for NaN."""
    x = float(x)
    return None if not math.isfinite(x) else round(x, DIGITS) + 0.0  # + 0.0 turns -0.0 into 0.0


def build_report(results: dict[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
                 video_ids: Sequence[str] = (), params: dict | None = None, k_wins: int = 5,
                 streams: Sequence[str] = ("spatial", "temporal"), best: str | None = None,
                 val_accuracy: dict | None = None) -> dict:
    """A JSON-ready report. `results` maps name -> N x C scores: the streams (named in `streams`)
    then the fusion methods, in the order to print them. `best`: the fusion chosen (on the
    validation part, by the caller); `val_accuracy`: each fusion's validation top-1."""
    labels = np.asarray(labels, np.int64)
    n_cls = len(class_names)
    rows, per_class = [], {}
    for name, s in results.items():
        if s.shape != (len(labels), n_cls):
            raise ValueError(f"scores of {name!r} are {s.shape}, expected ({len(labels)}, {n_cls})")
        m = metrics(s, labels, n_cls)
        row = {"method": name, "kind": "stream" if name in streams else "fusion", **{k: _r(v) for k, v in m.items()}}
        if val_accuracy and name in val_accuracy:
            row["val_top1"] = _r(val_accuracy[name])
        rows.append(row)
        per_class[name] = per_class_accuracy(s, labels, n_cls)
    fusions = [r["method"] for r in rows if r["kind"] == "fusion"]
    shown = best if best is not None else (fusions[0] if fusions else None)
    report = {"videos": len(labels), "classes": list(class_names), "streams": list(streams), "methods": rows,
              "best_fusion": best, "best_chosen_on": "validation" if best else None, "params": params or {},
              "per_class_accuracy": {name: [_r(v) for v in acc] for name, acc in per_class.items()},
              "videos_per_class": [int(np.sum(labels == c)) for c in range(n_cls)]}
    stream_acc = {n: per_class[n] for n in streams if n in per_class}
    if len(stream_acc) >= 2:
        report["stream_wins"] = stream_wins(stream_acc, class_names, k_wins)
    if shown is not None:
        report["confusion_of"] = shown
        report["confusion"] = confusion_matrix(results[shown], labels, n_cls).tolist()
    if video_ids:
        report["video_ids_checksum"] = ids_checksum(list(video_ids))
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def render_markdown(report: dict) -> str:
    """The report as Markdown (accuracies in percent)."""
    has_val = any("val_top1" in r for r in report["methods"])
    lines = ["# Two-stream fusion report", "",
             f"{report['videos']} test videos, {len(report['classes'])} classes, streams "
             f"{', '.join(report.get('streams', []))}.", "",
             "| method | top-1 % | top-5 % | mean class acc % |" + (" val top-1 % |" if has_val else ""),
             "|---|---:|---:|---:|" + ("---:|" if has_val else "")]
    for r in report["methods"]:
        name = f"**{r['method']}**" if r["method"] == report.get("best_fusion") else r["method"]
        val = f" {_pct(r.get('val_top1'))} |" if has_val else ""
        lines.append(f"| {name} | {_pct(r['top1'])} | {_pct(r['top5'])} | {_pct(r['mean_class_acc'])} |{val}")
    if report.get("best_fusion"):
        lines += ["", f"Best fusion (chosen on the validation part): **{report['best_fusion']}**."]
    else:
        lines += ["", "No validation part, so no fusion was chosen as the best (set data.val_fraction > 0)."]
    if report.get("params"):
        lines += ["", "Parameters: " + ", ".join(f"{k} = {json.dumps(v, sort_keys=True)}"
                                                 for k, v in sorted(report["params"].items()))]
    for stream, wins in report.get("stream_wins", {}).items():
        lines += ["", f"## Classes where the {stream} stream wins most", ""]
        if not wins:
            lines.append(f"(none: the {stream} stream is nowhere better than every other stream)")
            continue
        lines += [f"| class | {stream} % | best other % | difference |", "|---|---:|---:|---:|"]
        lines += [f"| {w['class']} | {_pct(w['accuracy'])} | {_pct(w['best_other'])} | {_pct(w['difference'])} |"
                  for w in wins]
    pcs = report["per_class_accuracy"]
    names = list(pcs)
    lines += ["", "## Per-class accuracy %", "", "| class | videos | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for i, c in enumerate(report["classes"]):
        lines.append(f"| {c} | {report['videos_per_class'][i]} | " + " | ".join(_pct(pcs[n][i]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def render_table(report: dict) -> str:
    """Short plain-text table for the terminal."""
    has_val = any("val_top1" in r for r in report["methods"])
    width = max([len("method")] + [len(r["method"]) for r in report["methods"]])
    out = [f"{'method':<{width}}  {'top-1':>7}  {'top-5':>7}  {'mean-cls':>8}" + (f"  {'val top-1':>9}" if has_val else "")]
    for r in report["methods"]:
        mark = "  <- best fusion (validation)" if r["method"] == report.get("best_fusion") else ""
        val = f"  {_pct(r.get('val_top1')) if r['kind'] == 'fusion' else '':>9}" if has_val else ""
        out.append(f"{r['method']:<{width}}  {_pct(r['top1']):>7}  {_pct(r['top5']):>7}  "
                   f"{_pct(r['mean_class_acc']):>8}{val}{mark}")
    return "\n".join(out)


# ---------------------------------------------------------------- confusion matrix image

def draw_confusion(cm: np.ndarray, class_names: Sequence[str], title: str = "") -> np.ndarray:
    """Row-normalised confusion matrix as a BGR image: true class rows, predicted class columns,
    class names on both axes, counts written in the cells when there are few classes."""
    n = len(class_names)
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    cell = int(np.clip(1400 // max(n, 1), 12, 64))
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, float(np.clip(cell / 40, 0.3, 0.5))
    thick = 1
    names = [str(c) for c in class_names]
    text_w = max([cv2.getTextSize(s, font, scale, thick)[0][0] for s in names] + [10]) + 10
    text_h = cv2.getTextSize("Ag", font, scale, thick)[0][1]
    pad, title_h, axis_h = 10, 40, 24
    grid = n * cell
    legend_w = 70
    title_w = cv2.getTextSize(title, font, 0.6, 1)[0][0]
    width = max(pad + axis_h + text_w + grid + pad + legend_w, title_w + 2 * pad)
    height = title_h + text_w + grid + axis_h + pad
    img = np.full((height, width, 3), 255, np.uint8)
    x0, y0 = pad + axis_h + text_w, title_h + text_w

    heat = cv2.applyColorMap(np.uint8(np.rint(norm * 255)), cv2.COLORMAP_VIRIDIS)
    img[y0:y0 + grid, x0:x0 + grid] = cv2.resize(heat, (grid, grid), interpolation=cv2.INTER_NEAREST)
    for i in range(n + 1):  # cell borders
        cv2.line(img, (x0, y0 + i * cell), (x0 + grid, y0 + i * cell), (255, 255, 255), 1)
        cv2.line(img, (x0 + i * cell, y0), (x0 + i * cell, y0 + grid), (255, 255, 255), 1)
    if cell >= 28:  # counts in the cells, dark text on bright cells
        for i in range(n):
            for j in range(n):
                s = str(int(cm[i, j]))
                (tw, th), _ = cv2.getTextSize(s, font, scale, thick)
                colour = (0, 0, 0) if norm[i, j] > 0.6 else (255, 255, 255)
                cv2.putText(img, s, (x0 + j * cell + (cell - tw) // 2, y0 + i * cell + (cell + th) // 2),
                            font, scale, colour, thick, cv2.LINE_AA)
    for i, s in enumerate(names):  # row labels (true class), right-aligned
        tw = cv2.getTextSize(s, font, scale, thick)[0][0]
        cv2.putText(img, s, (x0 - 6 - tw, y0 + i * cell + (cell + text_h) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    # Column labels: write them horizontally on a strip, then rotate it to read bottom-up.
    strip = np.full((grid, text_w, 3), 255, np.uint8)
    for j, s in enumerate(names):
        cv2.putText(strip, s, (4, j * cell + (cell + text_h) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    img[title_h:title_h + text_w, x0:x0 + grid] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    cv2.putText(img, title, (pad, 28), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    label = "predicted"
    tw = cv2.getTextSize(label, font, 0.5, 1)[0][0]
    cv2.putText(img, label, (x0 + (grid - tw) // 2, y0 + grid + 18), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    side = np.full((axis_h, max(grid, 1), 3), 255, np.uint8)  # "true" along the left edge
    tw = cv2.getTextSize("true", font, 0.5, 1)[0][0]
    cv2.putText(side, "true", ((grid - tw) // 2, 17), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    img[y0:y0 + grid, pad:pad + axis_h] = cv2.rotate(side, cv2.ROTATE_90_COUNTERCLOCKWISE)
    # Colour bar: fraction of the true class's videos.
    lx = x0 + grid + pad
    bar = cv2.applyColorMap(np.uint8(np.linspace(255, 0, grid))[:, None].repeat(14, axis=1), cv2.COLORMAP_VIRIDIS)
    img[y0:y0 + grid, lx:lx + 14] = bar
    for v, y in ((1.0, y0 + 10), (0.0, y0 + grid)):
        cv2.putText(img, f"{v:.0%}", (lx + 18, y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img


# ---------------------------------------------------------------- writing

def write_report(out_dir: str | Path, report: dict, confusion_title: str = "") -> dict[str, Path]:
    """Write report.md, report.json and (when there is a best fusion) confusion.png into out_dir."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    write_atomic(paths["markdown"], render_markdown(report))
    write_json(paths["json"], report)
    if report.get("confusion") is not None:
        title = confusion_title or f"confusion: {report['confusion_of']} fusion (rows: true class, row-normalised)"
        ok, png = cv2.imencode(".png", draw_confusion(np.array(report["confusion"]), report["classes"], title))
        if not ok:
            raise RuntimeError("OpenCV could not encode the confusion matrix PNG")
        paths["confusion"] = out_dir / "confusion.png"
        write_atomic(paths["confusion"], png.tobytes())
    return paths

"""`python -m twostream ablate` (`make ablate`): the paper's input comparisons on a pipeline's data.

The grid (paper sec. 3.1 and Tables 1-2, plus the flow algorithms of the method guides):
- temporal: flow with L = 1, 5, 10 ([ablate] lengths), each with and without mean subtraction;
  trajectory and bi-directional flow at L = 10; stacked RGB frames (rgb_stack);
- spatial: from scratch, and with `pretrained` weights fine-tuned and last layer only (skipped,
  with a note, without a weights file);
- the temporal stream (flow, L = 10) on the same videos' flow from each of [ablate] algos,
  each extracted once into its own store beside data.store (<store>-<algo>).
Every cell is one stream trained with the pipeline's settings ([train] < [streams.temporal] or
[streams.spatial] < the cell's own) and scored with the test protocol. Results go to
{out}/ablate/table.md and table.json; a finished cell (cells/<cell>.json, with the settings it
was run with) is not retrained, so an interrupted ablation carries on.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import write_atomic, write_json
from core.schema import Pipeline, require_pipeline
from flowprep.store import Store
from flowprep.store_files import read_store_info
from trainer.fit import plain
from trainer.streams import get_input

log = logging.getLogger(__name__)


@dataclass
class Cell:
    name: str
    group: str
    base: str                      # the stream whose settings it starts from
    settings: dict                 # what it changes
    algo: str | None = None        # a flow algorithm other than the store's: its own store
    skip: str | None = None        # why it cannot run here
    notes: list = field(default_factory=list)


def grid(cfg: dict) -> list[Cell]:
    a = cfg["ablate"]
    cells = []
    for length in a["lengths"]:
        for ms in (True, False):
            cells.append(Cell(f"flow_L{length}" + ("" if ms else "_nomean"), "temporal: stacking, L, mean subtraction",
                              "temporal", {"input": "flow", "flow_length": length, "mean_subtraction": ms}))
    for kind in ("trajectory", "flow_bidir"):
        cells.append(Cell(f"{kind}_L10", "temporal: input kind", "temporal",
                          {"input": kind, "flow_length": 10, "mean_subtraction": True}))
    cells.append(Cell("rgb_stack", "temporal: input kind", "temporal",
                      {"input": "rgb_stack", "flow_length": a["rgb_stack_length"]}))
    weights = a["pretrained"] or cfg["train"]["pretrained"]
    cells.append(Cell("spatial_scratch", "spatial: initialisation", "spatial", {"input": "rgb", "pretrained": ""}))
    for name, extra in (("spatial_finetune", {}), ("spatial_last_layer", {"freeze": "backbone"})):
        cells.append(Cell(name, "spatial: initialisation", "spatial", {"input": "rgb", "pretrained": weights, **extra},
                          skip=None if weights else "needs pretrained weights (ablate.pretrained or --pretrained)"))
    own = read_store_info(cfg["data"]["store"]).get("algo", "tvl1")
    for algo in a["algos"]:
        if algo == own:
            continue  # the flow_L10 cell is this algorithm's
        cells.append(Cell(f"flow_{algo}", "temporal: flow algorithm", "temporal",
                          {"input": "flow", "flow_length": 10, "mean_subtraction": True}, algo=algo,
                          skip=None if cfg["data"]["videos"] else "needs data.videos to extract the flow"))
    return cells


def _algo_store(cfg: dict, algo: str) -> Path:
    """The same videos' flow with another algorithm, extracted once beside the pipeline's store."""
    from flowprep.extract_job import run_extract
    from flowprep.extract_options import STORE_KEYS, ExtractOptions

    root = Path(cfg["data"]["store"])
    out = root.with_name(f"{root.name}-{algo}")
    info = read_store_info(root)
    values = {k: info[k] for k in STORE_KEYS if k in info and k not in ("device", "preset")}
    values.update(algo=algo, device="cpu", rgb=False)
    ex = cfg["extract"]
    summary = run_extract(cfg["data"]["videos"], out, ExtractOptions(**values), backend=ex["backend"],
                          workers=ex["workers"], address=ex["address"], progress=True)
    if summary.failed:
        log.warning(f"{algo}: {len(summary.failed)} videos failed to extract; see {out}/manifest.jsonl")
    return out


def _has_backward(store: Path) -> bool:
    s = Store(store)
    ids = s.video_ids()[:1]
    if not ids:
        return False
    with s.open(ids[0]) as v:
        return v.num_bflows > 0


def run_cell(cfg: dict, cell: Cell, out: Path) -> dict:
    from trainer.config import stream_settings
    from trainer.evaluate import score_stream
    from trainer.report import metrics
    from trainer.train import main as train

    settings = {k: v for k, v in stream_settings(cfg, cell.base).items() if k != "name"}
    settings.update(cell.settings)
    if cfg["ablate"]["epochs"]:
        settings["epochs"] = cfg["ablate"]["epochs"]
    # A pipeline derived from validated parts: the cell's stream settings come from stream_settings.
    run = Pipeline({**cfg, "out": str(out), "streams": {**cfg["streams"], cell.name: settings}})
    if cell.algo:
        run["data"] = {**cfg["data"], "store": str(_algo_store(cfg, cell.algo))}
    t0 = time.perf_counter()
    train(run, cell.name)
    scores = score_stream(run, cell.name, "test", show=False)
    m = metrics(scores.scores, scores.labels, len(scores.class_names))
    return {"cell": cell.name, "group": cell.group, "settings": plain(settings), "algo": cell.algo,
            "top1": round(m["top1"], 6), "mean_class_acc": round(m["mean_class_acc"], 6),
            "videos": len(scores.labels), "seconds": round(time.perf_counter() - t0, 1)}


def ablate(cfg: Pipeline, only: list[str] | None = None) -> dict:
    """Run (or resume) the grid; returns {"cells": [...], "paths": {...}}."""
    cfg = require_pipeline(cfg, "ablate")
    out = Path(cfg["out"]) / "ablate"
    cells = grid(cfg)
    if only:
        unknown = sorted(set(only) - {c.name for c in cells})
        if unknown:
            raise ValueError(f"unknown ablation cell(s) {', '.join(unknown)}; cells: {', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in only]
    backward = [c for c in cells if "input" in c.settings and "bflow" in get_input(c.settings["input"]).reads]
    if backward and not _has_backward(Path(cfg["data"]["store"])):
        for c in backward:
            c.skip = "the store has no backward flow: extract with --direction both"
    results = []
    for i, cell in enumerate(cells, 1):
        path = out / "cells" / f"{cell.name}.json"
        if cell.skip:
            log.info(f"ablate [{i}/{len(cells)}] {cell.name}: skipped ({cell.skip})")
            results.append({"cell": cell.name, "group": cell.group, "skipped": cell.skip})
            continue
        if path.is_file():
            done = json.loads(path.read_text())
            log.info(f"ablate [{i}/{len(cells)}] {cell.name}: done before, top-1 {100 * done['top1']:.2f}%")
            results.append(done)
            continue
        log.info(f"ablate [{i}/{len(cells)}] {cell.name}: training ...")
        res = run_cell(cfg, cell, out)
        write_json(path, res)
        log.info(f"ablate [{i}/{len(cells)}] {cell.name}: top-1 {100 * res['top1']:.2f}%, mean class "
                 f"{100 * res['mean_class_acc']:.2f}% ({res['seconds']:.0f} s)")
        results.append(res)
    paths = {"json": write_json(out / "table.json", {"cells": results}),
             "markdown": write_atomic(out / "table.md", render(results))}
    return {"cells": results, "paths": paths}


def render(results: list[dict]) -> str:
    lines = ["| group | cell | input | L | mean sub. | top-1 % | mean class % | time |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['group']} | {r['cell']} | | | | skipped: {r['skipped']} | | |")
            continue
        s = r["settings"]
        inp = s["input"] + (f" ({r['algo']})" if r.get("algo") else "")
        flowish = get_input(s["input"]).is_flow
        lines.append(f"| {r['group']} | {r['cell']} | {inp} | {s['flow_length'] if s['input'] != 'rgb' else ''} | "
                     f"{('on' if s['mean_subtraction'] else 'off') if flowish else ''} | {100 * r['top1']:.2f} | "
                     f"{100 * r['mean_class_acc']:.2f} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"

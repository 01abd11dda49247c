"""`python -m twostream predict VIDEO...`: classify new videos with a pipeline's trained streams.

Each video goes through exactly what the training videos went through: `flowprep`'s own
extraction (decode, resize, step, TV-L1 or the recorded algorithm and preset, clip and quantize
with the recorded bound, JPEG round trip at the recorded quality), with the settings the store
recorded in store.json, into a temporary store; then every stream of fusion.streams scores it
with the test protocol ([eval]) and the scores are fused with the fusion fitted by fuse-eval
(fusion/fusion.pt: its best method, chosen on the validation part), or averaged when there is
none. A video that cannot be decoded or is too short is reported with the reason; the others go
on. Results: a top-5 table per video on the terminal, predictions.csv and predictions.json.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from flowprep.extract import extract_video
from flowprep.distribute import local_cores
from flowprep.extract_job import with_idle_cores
from flowprep.extract_options import STORE_KEYS, ExtractOptions
from flowprep.store_files import read_store_info, write_store_info
from trainer.checkpoint import load_best
from trainer.data import ProtocolDataset, make_loader
from trainer.evaluate import load_stream_model, predict as protocol_scores
from trainer.fusion import METHODS, FusionError, load_fitted
from trainer.scores import Scores
from trainer.streams import get_input
from trainer.utils import pick_device, setup_device
from core.atomic import write_atomic
from core.schema import ConfigError, Pipeline, require_pipeline

log = logging.getLogger(__name__)


def extraction_options(store_root: str | Path, device: torch.device) -> ExtractOptions:
    """The options the store was extracted with (store.json: the engine too), so new videos get the same input."""
    info = read_store_info(store_root)
    values = {k: info[k] for k in STORE_KEYS if k in info and k != "device"}
    if info.get("preset") is None:
        values.pop("preset", None)
    if info.get("implementation") == "torch":  # the torch TV-L1: on the GPU when there is one
        values["device"] = "cuda" if device.type == "cuda" else "torch-cpu"
    return ExtractOptions(**values)


def fitted_fusion(cfg: dict, streams: list[str]) -> tuple[str, dict | None]:
    """(method, fitted fusion) as fuse-eval saved it, or ("average", None) without one."""
    path = Path(cfg["out"]) / "fusion" / "fusion.pt"
    if not path.is_file():
        return "average", None
    fitted = load_fitted(path)
    if list(fitted["streams"]) != streams:
        log.warning(f"{path} fuses {fitted['streams']}, not {streams}; averaging instead")
        return "average", None
    return fitted.get("best") or "average", fitted


def predict_videos(cfg: Pipeline, videos: list[str | Path], device: str | None = None, top: int = 5,
                   show: bool = False) -> dict:
    """Classify `videos`; returns {"method", "classes", "results": [per video], "failed": {path: reason}}."""
    cfg = require_pipeline(cfg, "predict_videos")
    streams = list(cfg["fusion"]["streams"])
    cks = {s: load_best(cfg["out"], s) for s in streams}
    classes = list(cks[streams[0]]["class_names"])
    for s, ck in cks.items():
        if list(ck["class_names"]) != classes:
            raise ConfigError(f"the {s} stream was trained on other classes than {streams[0]}; retrain on one split")
    dev = pick_device(device or cfg["train"]["device"])
    setup_device(dev, cfg["train"]["threads"], cfg["train"]["deterministic"])
    opts = extraction_options(cfg["data"]["store"], dev)
    method, fitted = fitted_fusion(cfg, streams)
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="twostream-predict-") as tmp:
        root = Path(tmp) / "store"
        flow = opts.flow_spec()  # what the store was made with, resolved once
        flow = with_idle_cores(flow, local_cores())   # one video at a time: its rows in parallel
        write_store_info(root, opts.store_info(flow))
        ids, sources, counts = [], [], []
        for k, src in enumerate(videos):
            vid = f"v{k:05d}"
            rec = extract_video(src, root, vid, opts, flow)
            if rec["status"] != "ok":
                failed[str(src)] = rec.get("error") or rec["status"]
                log.warning(f"{src}: {failed[str(src)]}")
                continue
            ids.append(vid)
            sources.append(str(src))
            counts.append((rec["frames"], rec["flows"]))
        per_stream = []
        for s in streams:
            ck = cks[s]
            kind = get_input(ck.get("input", "rgb"))
            if kind.needs_rgb and not opts.rgb:
                raise ConfigError(f"the {s} stream needs RGB frames, but the store was extracted with --no-rgb")
            model = load_stream_model(ck, dev)
            ds = ProtocolDataset(root, ids, [0] * len(ids), counts, kind=kind, crop_size=int(ck["crop_size"]),
                                 flow_length=int(ck["flow_length"]), samples=cfg["eval"]["segments"],
                                 crops=cfg["eval"]["crops"])
            loader = make_loader(ds, range(len(ds)), cfg["eval"]["batch_size"], 0, dev)
            probs, feats = protocol_scores(model, loader, dev, kind, int(ck["flow_length"]),
                                           bool(ck["mean_subtraction"]), len(ids), len(classes), show,
                                           label=f"{s} (test protocol)", arch=ck["arch"]) if ids else \
                (np.zeros((0, len(classes))), None)
            per_stream.append(Scores(ids, np.zeros(len(ids), np.int64), classes, probs, {}, feats))
    if not ids:
        return {"method": method, "classes": classes, "results": [], "failed": failed, "streams": streams}
    if fitted is not None and method in fitted["params"]:
        fused = METHODS[method].apply(fitted["params"][method], per_stream)
    elif method == "average":
        fused = METHODS["average"].apply({}, per_stream)
    else:
        raise FusionError(f"the fitted fusion {method!r} has no parameters in fusion.pt; re-run fuse-eval")
    results = []
    for i, src in enumerate(sources):
        order = np.argsort(-fused[i], kind="stable")[:top]
        results.append({"video": src, "prediction": classes[order[0]],
                        "top": [{"class": classes[c], "score": round(float(fused[i, c]), 6)} for c in order],
                        "streams": {s: classes[int(p.scores[i].argmax())] for s, p in zip(streams, per_stream)}})
    return {"method": method, "classes": classes, "results": results, "failed": failed, "streams": streams}


def render(result: dict) -> str:
    """The top-k table of every video, then the failures."""
    lines = [f"fusion: {result['method']} of {', '.join(result['streams'])}"]
    for r in result["results"]:
        lines.append(f"\n{r['video']}: {r['prediction']}   (streams: "
                     + ", ".join(f"{s} {c}" for s, c in r["streams"].items()) + ")")
        lines += [f"  {k + 1}. {t['class']:<30} {t['score']:.4f}" for k, t in enumerate(r["top"])]
    for video, why in result["failed"].items():
        lines.append(f"\n{video}: FAILED: {why}")
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["video", "status", "prediction", "score", "top5", "reason"])
    for r in result["results"]:
        w.writerow([r["video"], "ok", r["prediction"], r["top"][0]["score"],
                    ";".join(f"{t['class']}:{t['score']:.4f}" for t in r["top"]), ""])
    for video, why in result["failed"].items():
        w.writerow([video, "failed", "", "", "", why])
    return {"csv": write_atomic(out_dir / "predictions.csv", buf.getvalue()),
            "json": write_atomic(out_dir / "predictions.json", json.dumps(result, indent=1) + "\n")}

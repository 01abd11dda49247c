"""`python -m twostream fuse-eval`: score the streams with the test protocol, fuse, report.

Per stream (fusion.streams, two or more) it needs the test part's scores, the validation
part's (to choose the best fusion, and the weights when none are given) and the training
part's for the methods fitted on it (trainer/fusion.py says which). Scores come from
`trainer.evaluate.score_stream`, which also saves them as `{out}/<stream>/scores_<part>.npz`;
with --reuse-scores existing files are read instead (refused when they were computed from
another checkpoint, split or protocol), so fusion can be re-run in seconds.

Results go to `{out}/fusion/`: report.md, report.json, confusion.png, scores_<method>.npz,
timings.json (seconds each method took to fit and apply), and fusion.pt + fusion.json: every
fitted method's parameters, for predictions on new videos. The
best fusion is the one with the best validation accuracy, never chosen on the test part.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from core.atomic import write_atomic
from core.schema import Pipeline, require_pipeline
from core.splits import check_same_split
from trainer.fusion import METHODS, FusionError, check_streams, describe, save_fitted
from trainer.report import build_report, metrics, render_table, write_report
from trainer.scores import Scores, load_scores, save_scores, scores_file


def _dataset(cfg: dict, stream: str) -> str:
    """The dataset whose head a multi-task stream is scored with (fusion.dataset), else ""."""
    from trainer.config import stream_settings

    if not cfg["fusion"].get("dataset") or stream not in cfg.get("streams", {}):
        return ""
    return cfg["fusion"]["dataset"] if stream_settings(cfg, stream)["datasets"] else ""


def scores_path(cfg: dict, stream: str, part: str) -> Path:
    return scores_file(Path(cfg["out"]) / stream, part, _dataset(cfg, stream))


def _data_cfg(cfg: dict) -> dict:
    """The pipeline as seen by the fused dataset: fusion.dataset's [datasets.NAME] in place of [data]."""
    ds = cfg["fusion"].get("dataset")
    return {**cfg, "data": cfg["datasets"][ds]} if ds else cfg


def _check_fresh(cfg: dict, scores: Scores, stream: str, part: str, path: Path) -> None:
    """Refuse reused scores computed on another split or with another protocol than asked now."""
    meta = scores.meta
    if not meta:
        return  # written by hand or by an older version: nothing recorded to compare
    data_cfg = _data_cfg(cfg)
    if data_cfg.get("data", {}).get("splits"):
        from core.splits import split_from_config, split_identity

        check_same_split(meta.get("split"), split_identity(split_from_config(data_cfg), data_cfg),
                         f"the scores in {path}")
    ev = cfg.get("eval", {})
    for key in ("segments", "crops"):
        if key in ev and meta.get(key) not in (None, ev[key]):
            raise FusionError(f"the scores in {path} were computed with eval.{key} = {meta[key]!r}, the pipeline now "
                              f"says {ev[key]!r}; run fuse-eval without --reuse-scores to score {stream} again")
    best = Path(cfg["out"]) / stream / "best.pt"
    if best.is_file() and "checkpoint_epoch" in meta:
        import torch

        from trainer.checkpoint import epoch_of

        epoch = epoch_of(torch.load(best, map_location="cpu", weights_only=True))
        if epoch != meta["checkpoint_epoch"]:
            raise FusionError(f"the scores in {path} come from epoch {meta['checkpoint_epoch']} of the {stream} "
                              f"stream, but best.pt is now epoch {epoch}; run fuse-eval without --reuse-scores")


def get_scores(cfg: dict, stream: str, part: str, *, evaluate: bool = True, reuse_scores: bool = False) -> Scores:
    """One stream's scores on one part: read from its .npz (reuse, or when evaluate is False)
    or computed with the stream's best checkpoint (which writes the .npz)."""
    path = scores_path(cfg, stream, part)
    if (reuse_scores or not evaluate) and path.is_file():
        scores = load_scores(path)
        _check_fresh(cfg, scores, stream, part, path)
        return scores
    if not evaluate:
        raise FusionError(f"no {stream} scores for the {part} part at {path}; run fuse-eval without "
                          f"--reuse-scores so the {stream} stream's best checkpoint is evaluated")
    from trainer.evaluate import score_stream  # lazy: needs torch and the trained stream

    ds = _dataset(cfg, stream)
    return score_stream(cfg, stream, part, **({"dataset": ds} if ds else {}))


def resolve_methods(cfg: dict, methods: Sequence[str] | None) -> list[str]:
    chosen = list(methods) if methods else list(cfg["fusion"]["methods"])
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise FusionError(f"fusion methods must be among {', '.join(METHODS)}; got {chosen}")
    return list(dict.fromkeys(chosen))  # keep order, drop repeats


def fuse_eval(cfg: Pipeline, methods: Sequence[str] | None = None,
              streams_scores: dict[str, dict[str, Scores]] | None = None,
              evaluate: bool = True, reuse_scores: bool = False) -> dict:
    """Fuse the streams' scores with `methods` (default: fusion.methods) and write the report.

    streams_scores: {stream: {part: Scores}} to use as given (tests, notebooks); parts not in
    it are read or evaluated as in `get_scores`. Returns {"report", "paths", "table", "params"}.
    """
    cfg = require_pipeline(cfg, "fuse_eval")
    methods = resolve_methods(cfg, methods)
    if cfg["train"]["threads"]:  # the fusion heads train on the CPU: their numbers depend on it too
        import torch

        torch.set_num_threads(cfg["train"]["threads"])
    settings = cfg["fusion"]
    streams = list(settings["streams"])
    if len(streams) < 2:
        raise FusionError(f"fusion.streams must name at least two streams, got {streams}")
    if settings["weights"] and len(settings["weights"]) != len(streams):
        raise FusionError(f"fusion.weights gives {len(settings['weights'])} weights for the {len(streams)} streams "
                          f"{streams}; give one per stream, or none to choose them on the validation part")
    fit_parts = {m: METHODS[m].fits_on(settings) for m in methods}
    wanted = ["test", *dict.fromkeys(p for ps in fit_parts.values() for p in ps)]
    if settings.get("dataset") and settings["dataset"] not in cfg["datasets"]:
        raise FusionError(f"fusion.dataset = {settings['dataset']!r} is not a [datasets.NAME] of the pipeline")
    if "val" not in wanted and _data_cfg(cfg)["data"]["val_fraction"] > 0:
        wanted.append("val")  # the best fusion is chosen on it

    given = streams_scores or {}
    scores: dict[str, dict[str, Scores]] = {part: [] for part in wanted}
    for part in wanted:
        for stream in streams:
            s = given.get(stream, {}).get(part)
            if s is None and part == "val" and part not in {p for ps in fit_parts.values() for p in ps}:
                # needed only to pick the best fusion: when told not to run the networks, use what is there
                if (reuse_scores or not evaluate) and not scores_path(cfg, stream, part).is_file():
                    scores.pop("val", None)
                    break
                s = get_scores(cfg, stream, part, evaluate=evaluate, reuse_scores=reuse_scores)
            elif s is None:
                s = get_scores(cfg, stream, part, evaluate=evaluate, reuse_scores=reuse_scores)
            scores[part].append(s)
        if part in scores:
            check_streams(scores[part], f"{part} scores of {', '.join(streams)}")
    test = scores["test"]
    val = scores.get("val")
    if val is not None and not len(val[0].video_ids):
        val = None

    results = {name: s.scores for name, s in zip(streams, test)}
    params, val_acc = {}, {}
    seconds = {}
    for m in methods:
        method = METHODS[m]
        t0 = time.perf_counter()
        params[m] = method.fit({p: scores[p] for p in fit_parts[m]}, settings, test)
        results[m] = method.apply(params[m], test)
        seconds[m] = time.perf_counter() - t0
        if val is not None:
            val_acc[m] = metrics(method.apply(params[m], val), val[0].labels, len(val[0].class_names))["top1"]
    for name, (test_s, val_s) in _joint_scores(cfg, test, val, evaluate, reuse_scores).items():
        results[name] = test_s.scores
        if val_s is not None:
            val_acc[name] = metrics(val_s.scores, val_s.labels, len(val_s.class_names))["top1"]
    candidates = [m for m in results if m not in streams]
    best = max(candidates, key=lambda m: (val_acc.get(m, -1), -candidates.index(m))) if val_acc else None
    # The report shows what each fit chose and on what; the fitted arrays themselves are in fusion.pt.
    report_params = {m: describe({k: v for k, v in p.items() if k not in ("state", "module")
                                   and (not isinstance(v, np.ndarray) or v.size <= 64)})
                     for m, p in params.items() if p}
    t0 = test[0]
    report = build_report(results, t0.labels, t0.class_names, t0.video_ids, report_params, streams=streams,
                          best=best, val_accuracy=val_acc)
    out_dir = Path(cfg["out"]) / (f"fusion_{settings['dataset']}" if settings.get("dataset") else "fusion")
    paths = write_report(out_dir, report)
    for m in methods:
        paths[f"scores_{m}"] = save_scores(out_dir / f"scores_{m}.npz",
                                           Scores(t0.video_ids, t0.labels, t0.class_names, results[m],
                                                  {"method": m, "streams": streams}))
    fitted = {"streams": streams, "class_names": list(t0.class_names), "best": best, "methods": methods,
              "params": params, "split": t0.meta.get("split")}
    paths.update(save_fitted(out_dir, fitted))
    # Apart from the report, which stays byte-identical for the same scores.
    paths["timings"] = write_atomic(out_dir / "timings.json", json.dumps(
        {"fit_and_apply_seconds": {m: round(t, 3) for m, t in seconds.items()}}, indent=1) + "\n")
    return {"report": report, "paths": paths, "table": render_table(report), "params": params}


def _joint_scores(cfg: dict, test: list[Scores], val: list[Scores] | None, evaluate: bool,
                  reuse_scores: bool) -> dict[str, tuple[Scores, Scores | None]]:
    """Scores of the jointly fine-tuned networks of this run (train-fusion --joint), if any."""
    from trainer.heads import FUSIONS
    from trainer.joint import joint_dir, score_joint

    found = {}
    for method in FUSIONS:
        run_dir = joint_dir(cfg, method)
        if not (run_dir / "best.pt").is_file() and not (run_dir / "last.pt").is_file():
            continue
        got = []
        for part, ref in (("test", test), ("val", val)):
            if ref is None:
                got.append(None)
                continue
            path = scores_file(run_dir, part)
            if (reuse_scores or not evaluate) and path.is_file():
                s = load_scores(path)
                _check_fresh(cfg, s, f"joint_{method}", part, path)
            elif evaluate:
                s = score_joint(cfg, method, part)
            else:
                s = None
            if s is not None:
                check_streams([ref[0], s], f"{part} scores of the streams and of joint {method}")
            got.append(s)
        if got[0] is not None:
            found[f"{method} (joint)"] = (got[0], got[1])
    return found

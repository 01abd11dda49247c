"""`python -m trainer fuse-eval`: score both streams with the test protocol, fuse, report.

Per stream it needs the test part's scores, plus the training part's for the SVM and the
validation part's to choose fusion weights (when none are given). Scores come from
`trainer.evaluate.score_stream`, which also saves them as `{out}/<stream>/scores_<part>.npz`;
with --reuse-scores existing files are read instead, so fusion can be re-run in seconds.
Results go to `{out}/fusion/`: report.md, report.json, confusion.png, scores_<method>.npz.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from flowprep.store import StoreError
from trainer.config import ConfigError, load_pipeline
from trainer.fusion import FusionError, average, check_aligned, choose_weights, svm_fuse, weighted
from trainer.report import build_report, render_table, write_report
from trainer.scores import Scores, load_scores, save_scores
from trainer.splits import SplitError

METHODS = ("average", "weighted", "svm")
STREAMS = ("spatial", "temporal")


def scores_path(cfg: dict, stream: str, part: str) -> Path:
    return Path(cfg["out"]) / stream / f"scores_{part}.npz"


def get_scores(cfg: dict, stream: str, part: str, *, evaluate: bool = True, reuse_scores: bool = False) -> Scores:
    """One stream's scores on one part: read from its .npz (reuse, or when evaluate is False)
    or computed with the stream's best checkpoint (which writes the .npz)."""
    path = scores_path(cfg, stream, part)
    if (reuse_scores or not evaluate) and path.is_file():
        return load_scores(path)
    if not evaluate:
        raise FusionError(f"no {stream} scores for the {part} part at {path}; run fuse-eval without "
                          f"--reuse-scores so the {stream} stream's best checkpoint is evaluated")
    from trainer.evaluate import score_stream  # lazy: needs torch and the trained stream

    return score_stream(cfg, stream, part)


def resolve_methods(cfg: dict, methods: Sequence[str] | None) -> list[str]:
    chosen = list(methods) if methods else list(cfg.get("fusion", {}).get("methods", METHODS))
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise FusionError(f"fusion methods must be among {', '.join(METHODS)}; got {chosen}")
    return list(dict.fromkeys(chosen))  # keep order, drop repeats


def fuse_eval(cfg: dict, methods: Sequence[str] | None = None,
              streams_scores: dict[str, dict[str, Scores]] | None = None,
              evaluate: bool = True, reuse_scores: bool = False) -> dict:
    """Fuse the streams' scores with `methods` (default: cfg fusion.methods) and write the report.

    streams_scores: {stream: {part: Scores}} to use as given (tests, notebooks); parts not in
    it are read or evaluated as in `get_scores`. Returns {"report", "paths", "table", "weights"}.
    """
    methods = resolve_methods(cfg, methods)
    fcfg = cfg.get("fusion", {})
    given_weights = list(fcfg.get("weights", []) or [])
    if given_weights and len(given_weights) != 2:
        raise FusionError(f"fusion.weights must be [spatial, temporal] or empty, got {given_weights}")
    parts = ["test"]
    if "svm" in methods:
        parts.append("train")
    if "weighted" in methods and not given_weights:
        parts.append("val")

    given = streams_scores or {}
    scores: dict[str, dict[str, Scores]] = {}
    for stream in STREAMS:
        scores[stream] = {}
        for part in parts:
            if part in given.get(stream, {}):
                scores[stream][part] = given[stream][part]
            else:
                scores[stream][part] = get_scores(cfg, stream, part, evaluate=evaluate, reuse_scores=reuse_scores)
    sp, te = scores["spatial"], scores["temporal"]
    check_aligned(sp["test"], te["test"], "test spatial and temporal scores")

    results = {"spatial": sp["test"].scores, "temporal": te["test"].scores}
    params: dict = {}
    weights = None
    for m in methods:
        if m == "average":
            results[m] = average(sp["test"], te["test"])
        elif m == "weighted":
            if given_weights:
                weights, source = tuple(float(w) for w in given_weights), "given"
            else:
                weights = choose_weights(sp["val"], te["val"])
                source = f"chosen on {len(sp['val'].video_ids)} validation videos"
            results[m] = weighted(sp["test"], te["test"], weights)
            params["weights"] = [round(w, 6) for w in weights]
            params["weights_source"] = source
        elif m == "svm":
            c = float(fcfg.get("svm_c", 1.0))
            results[m], _ = svm_fuse(sp["train"], te["train"], sp["test"], te["test"], C=c)
            params["svm_c"] = c
            params["svm_train_videos"] = len(sp["train"].video_ids)

    test = sp["test"]
    report = build_report(results, test.labels, test.class_names, test.video_ids, params)
    out_dir = Path(cfg["out"]) / "fusion"
    paths = write_report(out_dir, report)
    for m in methods:
        paths[f"scores_{m}"] = save_scores(out_dir / f"scores_{m}.npz",
                                           Scores(test.video_ids, test.labels, test.class_names, results[m]))
    return {"report": report, "paths": paths, "table": render_table(report), "weights": weights}


def parse_weights(text: str) -> list[float]:
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not two comma-separated numbers like 1,1.5", param_hint="--weights")
    if len(w) != 2 or min(w) < 0 or sum(w) == 0:
        raise click.BadParameter(f"{text!r}: need spatial,temporal weights, non-negative, not both 0",
                                 param_hint="--weights")
    return w


@click.command("fuse-eval")
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline TOML file (pipelines/<name>.toml).")
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS),
              help="Fusion method; repeat for several. Default: fusion.methods of the pipeline.")
@click.option("--weights", default=None, help="Weighted fusion's spatial,temporal weights, e.g. 1,1.5 "
                                              "(default: fusion.weights, or chosen on the validation part).")
@click.option("--reuse-scores", is_flag=True, help="Read existing scores_<part>.npz instead of re-evaluating.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a pipeline setting; repeatable.")
def fuse_eval_command(pipeline: Path, methods: tuple[str, ...], weights: str | None, reuse_scores: bool,
                      overrides: tuple[str, ...]) -> None:
    """Evaluate both streams with the test protocol, fuse their scores and write {out}/fusion/report.*."""
    try:
        cfg = load_pipeline(pipeline, overrides)
        if weights is not None:
            cfg.setdefault("fusion", {})["weights"] = parse_weights(weights)
        result = fuse_eval(cfg, methods or None, reuse_scores=reuse_scores)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    except (FusionError, SplitError, StoreError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(result["table"])
    for name in ("markdown", "json", "confusion"):
        if name in result["paths"]:
            click.echo(f"wrote {result['paths'][name]}")

"""`python -m twostream` (the `twostream` command): train a stream, score it with the paper's test
protocol, fuse, predict, export, inspect. Thin over the trainer library; the pipeline file is read
and validated once here (twostream/pipeline.py) and the validated pipeline passed down.

Options are shorthands for pipeline keys, taken from the same schemas as the pipeline files
(trainer/config.py): the training options set the stream's own section, so they win over
[train] and [streams.NAME] in the file; `-o section.key=value` sets anything else and is
applied last. torch is imported only by the commands that need it, so `--help` is instant.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from core.data import DATA
from core.progress import verbosity_options
from core.schema import ConfigError, given
from core.splits import SplitError
from flowprep.store_base import StoreError
from trainer.config import STREAM, resolve_stream, stream_names, stream_settings
from trainer.fusion import METHODS, FusionError
from twostream.pipeline import describe, load_pipeline, read_pipeline

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
TRAIN_OPTIONS = ("arch", "pretrained", "freeze", "epochs", "batch_size", "lr", "optimizer", "schedule", "workers",
                 "device", "amp", "seed")


def errors() -> tuple[type[Exception], ...]:
    from trainer.models import ModelError

    return ConfigError, SplitError, StoreError, ModelError


def build_config(pipeline: str, stream: str, options: dict, overrides: tuple[str, ...]) -> tuple[dict, str]:
    """(validated pipeline, stream name): file < option shorthands < -o overrides (last wins)."""
    raw = read_pipeline(pipeline)
    name = resolve_stream(raw, stream)
    values = {}
    for key, value in given(options).items():
        if key in ("store", "split", "skip_missing"):
            values[f"data.{key}"] = value
        elif key == "out":
            values["out"] = value
        elif key == "resume":
            values[f"streams.{name}.resume"] = True if value == "true" else value
        else:
            values[f"streams.{name}.{key}"] = value
    return load_pipeline(pipeline, overrides, values, raw=raw), name


@click.group(context_settings=CONTEXT)
@verbosity_options
def main() -> None:
    """Train, evaluate and fuse the streams of a two-stream action recogniser.

    Progress shows as a bar on a terminal and as a status line every 30 s
    (TWOSTREAM_PROGRESS_SECONDS) when output goes to a file.
    """


def common_options(f):
    f = click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Set any pipeline key, e.g. -o train.weight_decay=1e-4 (repeatable; applied last).")(f)
    f = click.option("--out", "--output-dir", "out", type=click.Path(file_okay=False),
                     help="Run folder (pipeline `out`) [default: runs/<name>].")(f)
    f = DATA.options("store", "split", "skip_missing")(f)
    f = click.option("--pipeline", required=True, type=click.Path(dir_okay=False),
                     help="Pipeline file, e.g. pipelines/ucf101.toml.")(f)
    f = click.option("--stream", required=True, metavar="NAME",
                     help="spatial, temporal (or rgb, flow), or any [streams.NAME] of the pipeline.")(f)
    return f


def trained(summary: dict) -> str:
    """What a training run chose as best.pt, in words that fit what exists."""
    last = summary["log"][-1] if summary["log"] else {}
    if summary["has_val"]:
        by_loss = summary["best_by"] == "val_loss" and "val_loss" in summary["best_record"]
        how = f", lowest val loss {summary['best_record']['val_loss']:.4f}" if by_loss else ""
        return f"best val accuracy {summary['best_acc']:.4f} (epoch {summary['best_epoch']}{how}, best.pt)"
    return (f"no validation part (data.val_fraction = 0), so best.pt is the last epoch ({summary['best_epoch']}), "
            f"training accuracy {last.get('train_acc', float('nan')):.4f}")


def _fail(e: Exception) -> click.ClickException:
    """A sentence for the user: exit status 2 for settings to change, 1 for everything else."""
    if isinstance(e, ConfigError):
        return click.UsageError(str(e))
    if isinstance(e, OSError):  # a disk full or unwritable run folder: a sentence, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        return click.ClickException(f"{e.strerror or e}{where}; free some space or choose another --out")
    return click.ClickException(str(e))


@main.command(context_settings=CONTEXT)
@common_options
@STREAM.options(*TRAIN_OPTIONS)
@click.option("--resume", is_flag=False, flag_value="true", default=None, metavar="[PATH]",
              help="Continue from <out>/<stream>/last.pt, or from the checkpoint PATH.")
def train(stream, pipeline, overrides, **options):
    """Train one stream (torchrun --nproc-per-node N -m trainer train ... for several GPUs)."""
    from trainer.fit import TrainingError
    from trainer.train import main as train_main

    try:
        cfg, name = build_config(pipeline, stream, options, overrides)
        summary = train_main(cfg, name)
    except (*errors(), TrainingError, OSError) as e:
        raise _fail(e) from e
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        click.echo(f"{name}: {trained(summary)}; checkpoints in {summary['out']}")


@main.command("evaluate", context_settings=CONTEXT)
@common_options
@STREAM.options("workers", "device")
@click.option("--part", type=click.Choice(["test", "val", "train"]), default="test")
@click.option("--dataset", default=None, metavar="NAME", help="A multi-task stream: the [datasets.NAME] to score "
              "(with that dataset's head).")
def evaluate_cmd(stream, pipeline, overrides, part, dataset, **options):
    """Score a trained stream with the test protocol ([eval]); writes {out}/<stream>/scores_<part>.npz."""
    try:
        cfg, name = build_config(pipeline, stream, options, overrides)
        from trainer.evaluate import score_stream

        s = score_stream(cfg, name, part, dataset=dataset)
    except (*errors(), OSError) as e:
        raise _fail(e) from e
    acc = float((s.scores.argmax(1) == s.labels).mean()) if len(s.labels) else float("nan")
    click.echo(f"{name} {part}: {len(s.labels)} videos, accuracy {acc:.4f}")


@main.command("show-config", context_settings=CONTEXT)
@click.option("--pipeline", type=click.Path(dir_okay=False), help="Show this pipeline's values (else the schema).")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def show_config(pipeline, overrides):
    """Every pipeline key with its default and meaning, or a pipeline's resolved values."""
    from twostream.pipeline import SECTIONS, TOP

    if pipeline is None:
        click.echo("\n\n".join(describe(s) for s in [TOP, *SECTIONS.values(), STREAM]))
        return
    try:
        cfg = load_pipeline(pipeline, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    import json

    shown = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "streams"}
    shown["streams"] = {n: stream_settings(cfg, n) for n in stream_names(cfg)}
    click.echo(json.dumps(shown, indent=1, default=list))


@main.command("train-fusion", context_settings=CONTEXT)
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False), help="Pipeline file.")
@click.option("--fusion", "method", required=True, help="calibrated, weighted, learned, feature or attention "
              "(heads only: also average, svm).")
@click.option("--joint", is_flag=True, help="Fine-tune the streams and the fusion end to end under the fused loss "
              "([joint] settings), instead of fitting the fusion on the frozen streams' scores.")
@click.option("--resume", is_flag=False, flag_value="true", default=None, metavar="[PATH]",
              help="--joint: continue from <out>/joint_<fusion>/last.pt, or from the checkpoint PATH.")
@click.option("--reuse-scores", is_flag=True, help="Heads only: read existing score files instead of re-scoring.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def train_fusion_cmd(pipeline, method, joint, resume, reuse_scores, overrides):
    """Train one fusion: heads only (on the streams' cached per-video scores and features), or --joint."""
    try:
        if resume is not None and not joint:
            raise ConfigError("--resume continues joint training: give --joint too (heads only trains in seconds)")
        values = {"joint.resume": True if resume == "true" else resume} if resume is not None else {}
        cfg = load_pipeline(pipeline, overrides, values)
        if joint:
            from trainer.joint import train_joint

            summary = train_joint(cfg, method)
            click.echo(f"joint {method}: {trained(summary)}; checkpoints in {summary['out']}")
        else:
            from trainer.fuse_eval import fuse_eval

            result = fuse_eval(cfg, [method], reuse_scores=reuse_scores)
            click.echo(result["table"])
            click.echo(f"wrote {result['paths']['fusion']}")
    except (*errors(), OSError) as e:
        raise _fail(e) from e
    except ValueError as e:  # FusionError and unknown fusion names
        raise click.ClickException(str(e)) from e


@main.command("predict", context_settings=CONTEXT)
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False), help="Pipeline whose streams classify.")
@STREAM.options("device")
@click.option("--top", type=click.IntRange(1, 100), default=5, help="Classes listed per video.")
@click.option("--out", "--output-dir", "out_dir", type=click.Path(file_okay=False),
              help="Where predictions.csv / .json go [default: <out>/predict].")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def predict_cmd(videos, pipeline, device, top, out_dir, overrides):
    """Classify VIDEOS with the trained streams and the fitted fusion (frames and flow made exactly as the
    store's were). Exit status 1 when some video could not be classified (the others still are)."""
    from pathlib import Path

    from trainer.predict import predict_videos, render, write_results

    try:
        cfg = load_pipeline(pipeline, overrides)
        result = predict_videos(cfg, list(videos), device=device, top=top)
        paths = write_results(result, out_dir or Path(cfg["out"]) / "predict")
    except (*errors(), OSError) as e:
        raise _fail(e) from e
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(render(result))
    click.echo(f"\nwrote {paths['csv']} and {paths['json']}")
    sys.exit(1 if result["failed"] else 0)


@main.command("export", context_settings=CONTEXT)
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False), help="Pipeline of the trained streams.")
@click.option("--stream", "streams", multiple=True, metavar="NAME", help="Stream to export (repeatable) "
              "[default: fusion.streams].")
@click.option("--out", "--output-dir", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the exported files [default: <out>/export].")
@click.option("--no-onnx", is_flag=True, help="TorchScript only.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def export_cmd(pipeline, streams, out_dir, no_onnx, overrides):
    """Write each stream as TorchScript (and ONNX with the onnx package) plus a JSON of its preprocessing."""
    from pathlib import Path

    from trainer.export import export_stream

    try:
        cfg = load_pipeline(pipeline, overrides)
        for s in streams or cfg["fusion"]["streams"]:
            name = resolve_stream(cfg, s)
            paths = export_stream(cfg, name, out_dir or Path(cfg["out"]) / "export", onnx=not no_onnx)
            click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
    except (*errors(), OSError) as e:
        raise _fail(e) from e


@main.command("ablate", context_settings=CONTEXT)
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False), help="Pipeline whose data to ablate on.")
@click.option("--cell", "cells", multiple=True, metavar="NAME", help="Only these cells (repeatable).")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def ablate_cmd(pipeline, cells, overrides):
    """Train the paper-shaped grid of stream inputs; writes <out>/ablate/table.md and table.json (resumable)."""
    from trainer.ablate import ablate

    try:
        result = ablate(load_pipeline(pipeline, overrides), list(cells) or None)
    except (*errors(), OSError) as e:
        raise _fail(e) from e
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(result["paths"]["markdown"].read_text())
    click.echo(f"wrote {result['paths']['markdown']} and {result['paths']['json']}")


def parse_weights(text: str) -> list[float]:
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not comma-separated numbers like 1,1.5", param_hint="--weights")
    if len(w) < 2 or min(w) < 0 or sum(w) == 0:
        raise click.BadParameter(f"{text!r}: need one weight per stream (at least two), non-negative, not all 0",
                                 param_hint="--weights")
    return w


@main.command("fuse-eval", context_settings=CONTEXT)
@click.option("--pipeline", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline TOML file (pipelines/<name>.toml).")
@click.option("--method", "methods", multiple=True, type=click.Choice(list(METHODS)),
              help="Fusion method; repeat for several. Default: fusion.methods of the pipeline.")
@click.option("--streams", default=None, help="Comma-separated streams to fuse (default: fusion.streams, "
                                              "spatial,temporal).")
@click.option("--weights", default=None, help="Weighted fusion's weights, one per stream, e.g. 1,1.5 "
                                              "(default: fusion.weights, or chosen on the validation part).")
@click.option("--reuse-scores", is_flag=True, help="Read existing scores_<part>.npz instead of re-evaluating.")
@click.option("--dataset", default=None, metavar="NAME", help="With multi-task streams: fuse on this "
              "[datasets.NAME] (fusion.dataset); the report goes to {out}/fusion_NAME/.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a pipeline setting; repeatable.")
def fuse_eval_command(pipeline: Path, methods: tuple[str, ...], streams: str | None, weights: str | None,
                      reuse_scores: bool, dataset: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate the streams with the test protocol, fuse their scores and write {out}/fusion/report.*."""
    extra = [f"fusion.dataset={json.dumps(dataset)}"] if dataset else []
    if streams is not None:
        extra.append(f"fusion.streams={json.dumps([s.strip() for s in streams.split(',') if s.strip()])}")
    if weights is not None:
        extra.append(f"fusion.weights={json.dumps(parse_weights(weights))}")
    try:
        from trainer.fuse_eval import fuse_eval

        cfg = load_pipeline(pipeline, [*overrides, *extra])
        result = fuse_eval(cfg, methods or None, reuse_scores=reuse_scores)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    except (FusionError, SplitError, StoreError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(result["table"])
    for name in ("markdown", "json", "confusion", "fusion"):
        if name in result["paths"]:
            click.echo(f"wrote {result['paths'][name]}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

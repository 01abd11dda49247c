"""`python -m trainer`: train a stream, or score it with the paper's test protocol.

Options are shorthands for pipeline overrides on the stream's own section (so they win
over [train] and [<stream>] in the file); `-o section.key=value` sets anything else and
is applied last.
"""
from __future__ import annotations

import os

import click

from flowprep.store import StoreError
from trainer.config import ConfigError, apply_override, load_pipeline, set_key
from trainer.fuse_eval import fuse_eval_command
from trainer.models import ModelError
from trainer.splits import SplitError

ERRORS = (ConfigError, SplitError, StoreError, ModelError)


def build_config(pipeline: str, stream: str, options: dict, overrides: tuple[str, ...]) -> dict:
    """Pipeline file + option shorthands + -o overrides, in that order of precedence (last wins)."""
    names = {"store": "data.store", "split": "data.split", "skip_missing": "data.skip_missing", "out": "out",
             "arch": f"{stream}.arch", "pretrained": f"{stream}.pretrained", "epochs": f"{stream}.epochs",
             "batch_size": f"{stream}.batch_size", "lr": f"{stream}.lr", "schedule": f"{stream}.schedule",
             "workers": f"{stream}.workers", "device": f"{stream}.device", "seed": f"{stream}.seed",
             "resume": f"{stream}.resume"}
    cfg = load_pipeline(pipeline)
    for key, value in options.items():
        if value is not None and value is not False:  # not given on the command line
            set_key(cfg, names[key], value)
    for o in overrides:
        apply_override(cfg, o)
    return cfg


@click.group()
def main() -> None:
    """Train and evaluate the two streams of a two-stream action recogniser."""


def common_options(f):
    f = click.option("-o", "--override", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Set any pipeline key, e.g. -o train.weight_decay=1e-4 (repeatable; applied last).")(f)
    f = click.option("--skip-missing", is_flag=True, default=None,
                     help="Leave out videos missing or incomplete in the store (with a warning) instead of stopping.")(f)
    f = click.option("--out", type=click.Path(file_okay=False), help="Run directory (pipeline `out`).")(f)
    f = click.option("--device", help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--workers", type=int, help="Data loader worker processes per GPU.")(f)
    f = click.option("--split", type=int, help="Split number (UCF-101: 1-3, HMDB-51: 1-3).")(f)
    f = click.option("--store", "--data-root", "store", type=click.Path(), help="flowprep store to read (data.store).")(f)
    f = click.option("--pipeline", required=True, type=click.Path(dir_okay=False),
                     help="Pipeline file, e.g. pipelines/ucf101.toml.")(f)
    f = click.option("--stream", required=True, type=click.Choice(["spatial", "temporal"]))(f)
    return f


@main.command()
@common_options
@click.option("--arch", help="Backbone: resnet18/34/50/101/152, vgg16, vgg16_bn, ...")
@click.option("--pretrained", type=click.Path(dir_okay=False),
              help="Local torchvision ImageNet state_dict file (never downloaded); cross-modality init for temporal.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int, help="Global batch size (split across GPUs).")
@click.option("--lr", type=float)
@click.option("--schedule", type=click.Choice(["step", "cosine", "constant"]))
@click.option("--seed", type=int)
@click.option("--resume", is_flag=True, default=None, help="Continue from {out}/<stream>/last.pt.")
def train(stream, pipeline, overrides, **options):
    """Train one stream (torchrun --nproc-per-node N -m trainer train ... for several GPUs)."""
    from trainer.train import TrainingError, main as train_main

    try:
        summary = train_main(build_config(pipeline, stream, options, overrides), stream)
    except ERRORS + (TrainingError,) as e:
        raise click.ClickException(str(e)) from e
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        click.echo(f"{stream}: best val accuracy {summary['best_acc']:.4f}; checkpoints in {summary['out']}")


@main.command("evaluate")
@common_options
@click.option("--part", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
def evaluate_cmd(stream, pipeline, overrides, part, **options):
    """Score a trained stream with the test protocol ([eval]); writes {out}/<stream>/scores_<part>.npz."""
    from trainer.evaluate import score_stream

    try:
        s = score_stream(build_config(pipeline, stream, options, overrides), stream, part)
    except ERRORS as e:
        raise click.ClickException(str(e)) from e
    acc = float((s.scores.argmax(1) == s.labels).mean()) if len(s.labels) else float("nan")
    click.echo(f"{stream} {part}: {len(s.labels)} videos, accuracy {acc:.4f}")


main.add_command(fuse_eval_command)

"""`flowprep` command line: extract, verify, show. Thin over flowprep.extract / verify / show."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from flowprep.extract import EXTRACT, JOB_KEYS, ExtractError, ExtractOptions, run_extract
from flowprep.store import StoreError
from flowprep.synth import synth_command
from twostream.schema import ConfigError, given


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flowprep: decode videos and compute TV-L1 optical flow into a store the two-stream trainer reads."""


@main.command(context_settings={"show_default": True})
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False),
              help="Settings from a pipeline file (pipelines/*.toml): --videos and --out from [data] videos/store, "
                   "the rest from [extract]; options given here win.")
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of videos (searched recursively). Video id = path inside it without extension; "
                   "class = its first folder.")
@click.option("--out", "--output-dir", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Store folder [default: data/<name of the videos folder>/ under the current directory].")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extract only these videos: one path per line, relative to --videos.")
@EXTRACT.options()
@click.option("--overwrite", is_flag=True, help="Redo every video, even complete ones, and accept new parameters.")
def extract(pipeline, videos, out, list_file, overwrite, **options):
    """Extract RGB frames and TV-L1 flow of every video into a store.

    Resumable: re-running skips videos that are complete in the store. Exit status 0 when every
    video is done, 1 when some failed (the others are still extracted), 2 for a usage error.
    """
    from twostream.pipeline import load_pipeline

    chosen = given(options)
    try:
        cfg = load_pipeline(pipeline) if pipeline else None
        values = dict(cfg["extract"]) if cfg else {}
        if "short_side" in chosen and "size" not in chosen:
            values["size"] = None  # --short-side on the command line replaces the pipeline's size
        values = EXTRACT.validate({**values, **chosen})
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if videos is None and cfg and cfg["data"]["videos"]:
        videos = Path(cfg["data"]["videos"])
    if videos is None:
        raise click.UsageError("give --videos DIR (or --pipeline FILE with data.videos)")
    if not videos.is_dir():
        raise click.UsageError(f"videos folder {videos} does not exist (data.videos of {pipeline})")
    if out is None:
        out = Path(cfg["data"]["store"]) if cfg and cfg["data"]["store"] else Path.cwd() / "data" / videos.resolve().name
    click.echo(f"output: {out}", err=True)
    job = {k: values.pop(k) for k in JOB_KEYS}
    try:
        summary = run_extract(videos, out, ExtractOptions(**values), list_file=list_file, overwrite=overwrite,
                              progress=True, **job)
    except (ExtractError, ConfigError) as e:
        raise click.UsageError(str(e)) from None
    sys.exit(summary.exit_code)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Decoding threads.")
def verify(store, workers):
    """Decode every frame of every video in STORE; exit 1 if anything is missing, unreadable or failed."""
    from flowprep.verify import verify_store

    try:
        report = verify_store(store, workers)
    except StoreError as e:
        raise click.UsageError(str(e)) from None
    click.echo(report.format())
    sys.exit(report.exit_code)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("video_id")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("sheet.png"),
              show_default=True, help="PNG to write.")
@click.option("--frames", type=click.IntRange(min=1), default=4, show_default=True, help="Rows (evenly spaced).")
def show(store, video_id, out, frames):
    """Contact sheet of VIDEO_ID: RGB frames beside colour-coded flow (hue = direction, brightness = magnitude)."""
    from flowprep.show import write_contact_sheet

    try:
        path = write_contact_sheet(store, video_id, out, frames)
    except StoreError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {path}")


main.add_command(synth_command)

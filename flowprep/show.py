"""`flowprep show`: a contact sheet of a stored video, RGB frames beside colour-coded flow.

Flow colour (the Middlebury-style wheel): hue = direction of motion, brightness = magnitude,
full saturation; the sheet's header draws the wheel as the legend.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from flowprep.quant import dequantize
from core.atomic import write_atomic
from flowprep.store import Store


def flow_to_color(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """float HxWx2 flow (pixels) -> BGR uint8: hue = direction, value = magnitude / max_magnitude
    (default: the largest magnitude in `flow`, so faint motion stays visible)."""
    fx = np.asarray(flow[..., 0], np.float32)
    fy = np.asarray(flow[..., 1], np.float32)
    mag, ang = cv2.cartToPolar(fx, fy, angleInDegrees=True)
    if max_magnitude is None:
        max_magnitude = float(mag.max())
    hsv = np.empty(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = (ang / 2).astype(np.uint8) % 180  # OpenCV hue is 0..179
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(mag / max(max_magnitude, 1e-6) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def color_wheel(size: int = 64) -> np.ndarray:
    """The legend: flow_to_color of a disc whose flow at each point is its offset from the centre."""
    r = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - r
    wheel = flow_to_color(np.stack([xx, yy], -1), max_magnitude=r)
    wheel[xx ** 2 + yy ** 2 > r * r] = 255
    return wheel


def _label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def contact_sheet(root: str | Path, video_id: str, n: int = 4, min_width: int = 240) -> np.ndarray:
    """BGR image: one row per sampled flow index i (evenly spaced), RGB frame i beside flow i."""
    store = Store(root)
    with store.open(video_id) as v:
        bound = float(v.meta["bound"])
        idx = np.unique(np.linspace(0, v.num_flows - 1, min(n, v.num_flows)).round().astype(int))
        flows = [dequantize(v.flow(i), bound) for i in idx]
        rgbs = [cv2.cvtColor(v.rgb(i), cv2.COLOR_RGB2BGR) for i in idx] if v.has_rgb else None
    h, w = flows[0].shape[:2]
    scale = max(1, int(np.ceil(min_width / w)))
    top = max(float(np.hypot(f[..., 0], f[..., 1]).max()) for f in flows)  # one scale for the whole sheet

    def big(img):
        return cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)

    rows = []
    for k, i in enumerate(idx):
        tiles = [] if rgbs is None else [_label(big(rgbs[k]), f"frame {i + 1}")]
        tiles.append(_label(big(flow_to_color(flows[k], top)), f"flow {i + 1}"))
        rows.append(np.hstack(tiles))
    sheet = np.vstack(rows)
    wheel = color_wheel(48)
    header = np.full((56, sheet.shape[1], 3), 255, np.uint8)
    header[4:52, 4:52] = wheel[:, : min(48, sheet.shape[1] - 4)]
    cv2.putText(header, f"{video_id}  (max |flow| {top:.1f} px)", (60, 32), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([header, sheet])


def write_contact_sheet(root: str | Path, video_id: str, out: str | Path, n: int = 4) -> Path:
    """Write the contact sheet as PNG (atomically); returns the path."""
    out = Path(out)
    ok, buf = cv2.imencode(".png", contact_sheet(root, video_id, n))
    if not ok:
        raise RuntimeError("OpenCV could not PNG-encode the contact sheet")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.tobytes())
    return out

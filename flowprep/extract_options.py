"""The [extract] pipeline section: what a store holds (STORE_KEYS, recorded in store.json and every
video's metadata, so a resumed job must ask for the same) and how the job runs (JOB_KEYS).

One schema (core/schema.py) for the pipeline file, the validation and `flowprep extract`'s options.
"""
from __future__ import annotations

import cv2

from core.layout import DIRECTIONS, FLOW_CODECS, FORMATS, STORE_VERSION
from core.schema import ConfigError, Key, Options, Section, boolean, integer, number, optional, size, string
from flowprep.distribute import BACKENDS
from flowprep.flow import ALGORITHMS, ALGOS, DEVICE_HELP, ENGINES, PRESET_NAMES, FlowSpec, flow_spec, resolve_preset
from flowprep.presets import TVL1_PRESETS
from flowprep.quant import DEFAULT_BOUND

DEFAULT_SIZE = (340, 256)


def _preset_help() -> str:
    def fmt(p):
        return ", ".join(f"{k} {v}" for k, v in p.items())
    acc = TVL1_PRESETS["accurate"]
    return (f"Flow settings. TV-L1 (default accurate): accurate = OpenCV defaults, as denseflow ({fmt(acc)}); "
            f"fast = {fmt({k: v for k, v in TVL1_PRESETS['fast'].items() if acc[k] != v})}, "
            "rest as accurate: about 8x faster, a fraction of a pixel from accurate. DIS (default medium): "
            "ultrafast, fast, medium (OpenCV's presets). The other algorithms have none.")


def _check_extract(v: dict) -> dict:
    if v["size"] is not None and v["short_side"] is not None:
        raise ConfigError("give either extract.size (--size) or extract.short_side (--short-side), not both")
    if v["size"] is None and v["short_side"] is None:
        v["size"] = DEFAULT_SIZE
    if v["flow_codec"] != "jpeg" and v["format"] != "hdf5":
        raise ConfigError(f"extract.flow_codec (--flow-codec) = \"{v['flow_codec']}\" needs extract.format "
                          "(--format) = \"hdf5\": a JPEG store holds one JPEG file per frame")
    try:
        v["preset"] = resolve_preset(v["algo"], v["preset"])
    except ValueError as e:
        raise ConfigError(f"extract.preset (--preset) = \"{v['preset']}\": {e}") from None
    return v


STORE_KEYS = {
    "format": Key("jpeg", "jpeg: one JPEG per frame (denseflow/MMAction2 layout); hdf5: one .h5 file per video.",
                  choices=FORMATS),
    "size": Key(None, f"Resize every frame to exactly WxH before flow [default: {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}, "
                "unless --short-side].", optional(size), metavar="WxH"),
    "short_side": Key(None, "Instead of --size: scale so the short side is N, keeping the aspect ratio.",
                      optional(integer), min=8, flags=("--short-side", "--new-short"), metavar="N"),
    "bound": Key(DEFAULT_BOUND, "Clip flow to +-bound pixels before quantizing to uint8.", number, above=0),
    "jpeg_quality": Key(95, "JPEG quality of frames and flows.", integer, min=1, max=100),
    "step": Key(1, "Keep every step-th frame; flow is between consecutive kept frames.", integer, min=1),
    "algo": Key("tvl1", "; ".join(f"{a.name}: {a.help}" for a in ALGORITHMS.values()) + ".", choices=ALGOS),
    "preset": Key(None, _preset_help(), optional(string), choices=PRESET_NAMES),
    "rgb": Key(True, "Also store RGB frames. --no-rgb stores flow only (temporal stream); 'frames' still counts "
               "decoded frames, so flows = frames - 1.", boolean),
    "direction": Key("forward", "forward: flow from each frame to the next. both: also the backward flow, frame "
                     "i+1 to frame i (bflow_x_00001.jpg ..., HDF5 bflow_x/bflow_y), for the flow_bidir stream input. "
                     "Asking both of a finished forward store adds the backward flows and leaves the forward "
                     "ones as they are.", choices=DIRECTIONS),
    "flow_codec": Key("jpeg", "How HDF5 stores flow: jpeg (one JPEG per component frame, about 6 KB at 340x256) "
                      "or raw (uncompressed uint8 planes: lossless and about 4x faster to read, 87 KB). RGB stays "
                      "JPEG; --format jpeg allows jpeg only.", choices=FLOW_CODECS),
    "max_frames": Key(None, "Only the first N kept frames of each video (quick trials of a pipeline).",
                      optional(integer), min=2, metavar="N"),
    "device": Key("cpu", "cpu: TV-L1 of OpenCV (see --engine), one core per worker; cuda (or cuda:N): batched "
                  "torch TV-L1, one worker per GPU; torch-cpu: the torch TV-L1 on the CPU (to compare it with OpenCV).",
                  metavar=DEVICE_HELP.replace(" ", "")),
    "engine": Key("fused", "TV-L1 on the CPU: fused (OpenCV's flow bit for bit from a fused, compiled inner loop, "
                  "several times faster) or opencv (OpenCV's own). The two give the same store, so a store started "
                  "with one resumes with the other; where the fused engine cannot match OpenCV bit for bit (another "
                  "OpenCV build or CPU family), OpenCV computes the video and the manifest says so.", choices=ENGINES),
}
# Recorded with the store (store.json) but free to change on resume: the same store comes out.
FREE_ON_RESUME = ("engine",)
# How to run the job: not part of the store.
JOB_KEYS = {
    "backend": Key("ray", "ray: a local Ray cluster, or the one at --address; joblib: processes on this machine.",
                   choices=BACKENDS),
    "workers": Key(0, "Parallel videos, one core each. 0 = all cores (of this machine, or of the Ray cluster at "
                   "--address). Without --address, more than this machine's cores are capped at its cores; with it, "
                   "the number of tasks in flight.", integer, min=0, flags=("--workers", "-j")),
    "address": Key(None, "Existing Ray cluster: 'auto' or 'ray://HOST:PORT'. Every node must see --videos and "
                   "--out at the same paths.", optional(string)),
    "node_timeout": Key(600.0, "Ray: give up after this many seconds in which no node could run the remaining "
                        "videos (nodes lost, none with free CPUs): the job stops as after Ctrl-C, finished videos "
                        "kept, exit status 2. While it waits it says what for.", number, above=0, metavar="SECONDS"),
}
EXTRACT = Section("extract", {**STORE_KEYS, **JOB_KEYS}, _check_extract,
                  "flowprep extract: what a store holds and how the job runs.")


class ExtractOptions(Options):
    """What to extract (the STORE_KEYS); everything but `device` defines the store (`store_info`)."""

    SECTION = Section("extract", STORE_KEYS, _check_extract)

    def flow_spec(self) -> FlowSpec:
        """The flow these options compute (a job resolves it once and hands it to its tasks)."""
        return flow_spec(self.algo, self.preset, self.device, self.engine)

    def store_info(self, flow: FlowSpec | None = None) -> dict:
        """Parameters recorded in OUT/store.json (and every video's meta); a resumed job must match them.
        `flow`: these options' flow as the job resolved it (default: resolved here)."""
        flow = flow or self.flow_spec()
        return {
            "version": STORE_VERSION, "format": self.format,
            "size": list(self.size) if self.size else None, "short_side": self.short_side,
            "bound": float(self.bound), "jpeg_quality": self.jpeg_quality, "step": self.step,
            "algo": flow.algo, "preset": flow.preset, "params": dict(flow.params), "rgb": self.rgb,
            "max_frames": self.max_frames, "direction": self.direction, "flow_codec": self.flow_codec,
            # OpenCV TV-L1 and the torch port agree closely but not bit for bit.
            "implementation": flow.implementation, "engine": flow.engine,
            "opencv": cv2.__version__,
        }

"""`python -m twostream export`: a trained stream as TorchScript (and ONNX where the exporter works),
with a JSON of everything its input needs.

The exported module takes a batch as the loaders make it, [B, C, S, S] with values 0..255 (uint8
or float: RGB frames as stored, flow quantized as flowprep stores it), and returns class logits;
the input kind's normalisation is inside it. <stream>.json says how to build that batch: the
input kind and its channel order, L, the crop size and the short side to resize to first, the
test protocol (samples, crops, the flip rule), the flow bound and quantization, the class names.

ONNX needs the `onnx` package (`pip install onnx`); without it only TorchScript is written.
The checkpoint itself (best.pt's "model") is a plain torchvision state_dict: a ResNet or VGG of
`torchvision.models` with num_classes=K loads it (for flow inputs after replacing the first
convolution by one with the stream's channel count, as the JSON says).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import load_best
from trainer.evaluate import load_stream_model
from trainer.models import TORCHVISION_ARCHS, first_conv_name
from trainer.streams import get_input
from trainer.transforms import eval_scale
from core.atomic import save_atomic, write_atomic
from core.schema import Pipeline, require_pipeline

log = logging.getLogger(__name__)


class ExportedStream(nn.Module):
    """Normalisation (the input kind's) and the backbone in one module."""

    def __init__(self, net: nn.Module, input: str, flow_length: int, mean_subtraction: bool):
        super().__init__()
        self.net, self.kind = net, get_input(input)
        self.flow_length, self.mean_subtraction = flow_length, mean_subtraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.kind.to_network(x, self.flow_length, self.mean_subtraction))


def preprocessing(ck: dict, cfg: dict) -> dict:
    kind = get_input(ck.get("input", "rgb"))
    length = int(ck.get("flow_length", 10))
    crop = int(ck["crop_size"])
    store_info = {}
    try:
        from flowprep.store import read_store_info

        store_info = read_store_info(cfg["data"]["store"])
    except Exception:  # noqa: BLE001 - the store may not be on this machine; the rest still holds
        pass
    return {
        "stream": ck["stream"], "arch": ck["arch"], "input": kind.name, "input_doc": kind.doc,
        "channels": kind.load_channels(length), "network_channels": kind.channels(length), "flow_length": length,
        "value_range": "0..255 as stored: RGB frames (RGB order), or flow quantized to uint8",
        "flow_quantization": {"bound": store_info.get("bound", 20.0),
                              "formula": "q = round(255 * (clip(v, -b, b) + b) / (2b)), v = q * 2b / 255 - b"},
        "resize_short_side": eval_scale(crop), "crop_size": crop,
        "test_protocol": {"samples": cfg["eval"]["segments"], "crops": cfg["eval"]["crops"],
                          "average": "softmax averaged over samples and crops"},
        "flip": "mirror left-right; flow x channels (0, 2, 4, ...) become 255 - q" if kind.is_flow else "mirror",
        "normalization": ck.get("normalization"), "normalization_inside_model": True,
        "class_names": list(ck["class_names"]),
        "torchvision": (f"torchvision.models.{ck['arch']}(num_classes={ck['num_classes']}) loads best.pt['model']"
                        + (f" after replacing {first_conv_name(ck['arch'])} by a {ck['in_channels']}-channel conv"
                           if ck["in_channels"] != 3 else "")) if ck["arch"] in TORCHVISION_ARCHS else None,
        "extraction": {k: store_info.get(k) for k in ("size", "short_side", "step", "algo", "preset", "bound",
                                                    "jpeg_quality", "engine")} if store_info else None,
        "input_size": input_size(ck["arch"], crop),
    }


def input_size(arch: str, crop: int) -> dict:
    """Which H x W each exported file takes. TorchScript (traced) any; ONNX any too where the
    backbone pools adaptively before its classifier (torchvision's ResNets and VGGs), else
    exactly the training crop (the paper's CNN-M-2048 has a fixed-size classifier)."""
    free = arch in TORCHVISION_ARCHS
    return {"torchscript": "any H x W (the test protocol's crops are crop_size x crop_size)",
            "onnx": "any H x W (dynamic axes)" if free else f"{crop} x {crop} only (this architecture's classifier "
                                                           "takes a fixed size)"}


def export_stream(cfg: Pipeline, stream: str, out_dir: str | Path, onnx: bool = True) -> dict[str, Path]:
    """Write <stream>.torchscript.pt, <stream>.onnx (when possible) and <stream>.json into out_dir."""
    cfg = require_pipeline(cfg, "export_stream")
    out_dir = Path(out_dir)
    ck = load_best(cfg["out"], stream)
    model = ExportedStream(load_stream_model(ck, torch.device("cpu")), ck.get("input", "rgb"),
                           int(ck.get("flow_length", 10)), bool(ck.get("mean_subtraction", True))).eval()
    kind = get_input(ck.get("input", "rgb"))
    crop = int(ck["crop_size"])
    # uint8, as loaders give it: tracing then records the cast to float (a float example would not,
    # and uint8 input would then be normalised in integer arithmetic)
    example = torch.zeros(1, kind.load_channels(int(ck.get("flow_length", 10))), crop, crop, dtype=torch.uint8)
    paths = {}
    # TorchScript is what C++ and older runtimes load; torch's deprecation notice is not the user's concern
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.trace")
        traced = torch.jit.trace(model, example)
    paths["torchscript"] = save_atomic(out_dir / f"{stream}.torchscript.pt", lambda p: traced.save(str(p)))
    if onnx:
        try:
            # the TorchScript-based exporter: the dynamo one needs onnxscript, one more package
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                axes = {0: "batch", 2: "height", 3: "width"} if ck["arch"] in TORCHVISION_ARCHS else {0: "batch"}
                paths["onnx"] = save_atomic(out_dir / f"{stream}.onnx", lambda p: torch.onnx.export(
                    model, (example,), str(p), dynamo=False, input_names=["x"], output_names=["logits"],
                    dynamic_axes={"x": axes, "logits": {0: "batch"}}))
                log.info(f"{stream}: ONNX input {input_size(ck['arch'], crop)['onnx']}")
        except Exception as e:  # noqa: BLE001 - the exporter is optional: say why and go on
            log.warning(f"{stream}: no ONNX file ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "`pip install onnx` (or the `[export]` extra) to write one")
    paths["json"] = write_atomic(out_dir / f"{stream}.json", json.dumps(preprocessing(ck, cfg), indent=1) + "\n")
    return paths

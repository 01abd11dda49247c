"""The whole product on a very small synthetic set: synth -> extract -> train both streams ->
test protocol -> fusion -> classify new video files -> export. The set is built so that each
stream alone is stuck between two look-alike classes and only the fusion tells all four apart,
so the fused accuracy must beat both streams: broken flow, frames or flow missing from a
stream's input, scores misaligned between the streams or a broken fusion cost it its lead.
(Its motions are vertical, and a consistent channel-order swap would not hurt accuracy, so
flips and channel order are tested directly: test_trainer_transforms.py, test_trainer_streams.py.)
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowprep.extract_options import ExtractOptions
from flowprep.extract_job import run_extract
from flowprep.synth import synth_dataset
from trainer.export import export_stream
from trainer.fuse_eval import fuse_eval
from trainer.predict import predict_videos
from trainer.train import main as train
from twostream.pipeline import apply_override, load_pipeline
from videos import write_video


@pytest.mark.slow
def test_synth_extract_train_fuse_predict_export(tmp_path):
    videos, store, runs = tmp_path / "videos", tmp_path / "store", tmp_path / "runs"
    synth_dataset(videos, videos_per_class=16, frames=16, size=(64, 48), seed=0)
    summary = run_extract(videos, store, ExtractOptions(size=(64, 48), preset="fast"), workers=2,
                          backend="joblib", progress=False)
    assert summary.exit_code == 0 and len(summary.done) == 64

    cfg = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml")
    for o in [f"data.videos={json.dumps(str(videos))}", f"data.store={json.dumps(str(store))}",
              f"data.splits={json.dumps(str(videos / 'ucfTrainTestlist'))}", f"out={json.dumps(str(runs))}",
              "data.val_fraction=0.34", "train.epochs=25", "train.crop_size=48",
              "train.batch_size=8", "train.device=\"cpu\"", "temporal.flow_length=5", "eval.segments=5",
              "spatial.lr=0.003", "temporal.lr=0.003"]:
        apply_override(cfg, o)
    for stream in ("spatial", "temporal"):
        train(cfg, stream)
    result = fuse_eval(cfg, methods=["average", "svm"])

    top1 = {m["method"]: m["top1"] for m in result["report"]["methods"]}
    best_stream = max(top1["spatial"], top1["temporal"])
    assert top1["average"] > best_stream + 0.2, top1  # measured here: both streams 0.5, both fusions 1.0
    assert top1["svm"] > best_stream + 0.2, top1
    assert (runs / "fusion" / "report.md").is_file() and (runs / "fusion" / "confusion.png").is_file()

    # New video files, one per class, from the test groups; a broken and a too-short one go alongside.
    test_ids = (videos / "ucfTrainTestlist" / "testlist01.txt").read_text().split()
    picks = {Path(p).parts[0]: videos / p for p in test_ids}
    (tmp_path / "notes.avi").write_text("not a video")
    short = write_video(tmp_path / "short.avi", [np.zeros((48, 64, 3), np.uint8)])
    got = predict_videos(cfg, [*picks.values(), tmp_path / "notes.avi", short])
    assert got["method"] == result["report"]["best_fusion"]
    assert {Path(r["video"]).parent.name: r["prediction"] for r in got["results"]} == {c: c for c in picks}
    assert sorted(Path(v).name for v in got["failed"]) == ["notes.avi", "short.avi"]
    assert "only 1 frame" in got["failed"][str(short)]

    for stream in ("spatial", "temporal"):
        paths = export_stream(cfg, stream, tmp_path / "export")
        ts = torch.jit.load(str(paths["torchscript"]))
        info = json.loads(paths["json"].read_text())
        x = torch.randint(0, 256, (2, info["channels"], info["crop_size"], info["crop_size"]), dtype=torch.uint8)
        from trainer.checkpoint import load_best
        from trainer.evaluate import load_stream_model
        from trainer.streams import get_input

        ck = load_best(runs, stream)
        ref = load_stream_model(ck, torch.device("cpu")).eval()(get_input(ck["input"]).to_network(
            x, ck["flow_length"], ck["mean_subtraction"]))
        assert torch.allclose(ts(x), ref, atol=1e-4)
        assert info["class_names"] == ck["class_names"] and info["input"] == ck["input"]
        # Which input sizes each file takes is said, not left to be found out (ONNX: any, for a ResNet)
        assert info["input_size"]["onnx"] == "any H x W (dynamic axes)" and "any H x W" in info["input_size"]["torchscript"]
        big = torch.randint(0, 256, (1, info["channels"], info["crop_size"] + 16, info["crop_size"] + 8), dtype=torch.uint8)
        assert ts(big).shape == (1, len(ck["class_names"]))

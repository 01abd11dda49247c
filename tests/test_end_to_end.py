"""The whole product on a very small synthetic set: synth -> extract -> train both streams ->
test protocol -> fusion. The set is built so that each stream alone is stuck between two
look-alike classes and only the fusion tells all four apart, so the fused accuracy must beat
both streams; a bug anywhere along the way (flow, channel order, flips, scores alignment,
fusion) costs the fusion its lead."""
import json
from pathlib import Path

from flowprep.extract import ExtractOptions, run_extract
from flowprep.synth import synth_dataset
from twostream.pipeline import apply_override, load_pipeline
from trainer.fuse_eval import fuse_eval
from trainer.train import main as train


def test_synth_extract_train_fuse(tmp_path):
    videos, store, runs = tmp_path / "videos", tmp_path / "store", tmp_path / "runs"
    synth_dataset(videos, videos_per_class=16, frames=16, size=(64, 48), seed=0)
    summary = run_extract(videos, store, ExtractOptions(size=(64, 48), preset="fast"), workers=2,
                          backend="joblib", progress=False)
    assert summary.exit_code == 0 and len(summary.done) == 64

    cfg = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml")
    for o in [f"data.videos={json.dumps(str(videos))}", f"data.store={json.dumps(str(store))}",
              f"data.splits={json.dumps(str(videos / 'ucfTrainTestlist'))}", f"out={json.dumps(str(runs))}",
              "data.val_fraction=0.34", "train.epochs=25", "train.crop_size=48",
              "train.batch_size=8", "train.device=\"cpu\"", "temporal.flow_length=5", "eval.segments=5", "spatial.lr=0.003", "temporal.lr=0.003"]:
        apply_override(cfg, o)
    for stream in ("spatial", "temporal"):
        train(cfg, stream)
    result = fuse_eval(cfg, methods=["average", "svm"])

    top1 = {m["method"]: m["top1"] for m in result["report"]["methods"]}
    best_stream = max(top1["spatial"], top1["temporal"])
    assert top1["average"] > best_stream + 0.2, top1  # measured here: both streams 0.5, both fusions 1.0
    assert top1["svm"] > best_stream + 0.2, top1
    assert (runs / "fusion" / "report.md").is_file() and (runs / "fusion" / "confusion.png").is_file()

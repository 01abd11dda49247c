"""Joint fine-tuning: the separately trained streams and a fusion head, end to end under the
fused loss (`python -m twostream train-fusion --fusion attention --joint`).

    python -m twostream train-fusion --pipeline P --fusion attention --joint [--resume]
    torchrun --nproc-per-node 8 -m twostream train-fusion --pipeline P --fusion attention --joint

A TwoStreamNetwork is built from the streams' best.pt and the fusion fitted heads-only
(fusion/fusion.pt, when fuse-eval has run; a fresh head otherwise), then everything is trained on
aligned samples of the streams (data.JointDataset) by the loop every model shares
(trainer/fit.py: checkpoints, --resume, best epoch, logs), with the [train] settings overridden by
[joint] (use a small lr: the streams are trained already). The run folder {out}/joint_<fusion>/
holds last.pt / best.pt / log.jsonl like a stream's, and its scores of the test protocol, which
fuse-eval reports as "<fusion> (joint)". (Heads only, on the frozen streams' per-video scores, is
fuse-eval restricted to one method: trainer/fuse_eval.py.)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.progress import Progress
from core.schema import Pipeline, require_pipeline
from core.splits import check_same_split, split_from_config, split_identity
from flowprep.store import Store
from trainer import checkpoint as C
from trainer.config import JOINT, TRAIN
from trainer.data import ClipDataset, JointDataset, make_loader, training_loaders
from trainer.fit import fit, plain
from trainer.heads import fusion_module, make_fusion
from trainer.models import build_model, head
from trainer.network import TwoStreamNetwork
from trainer.scores import Scores, save_scores, scores_file
from trainer.tasks import check_videos
from trainer.utils import pick_device, setup_device, setup_process

log = logging.getLogger(__name__)


def joint_dir(cfg: dict, method: str) -> Path:
    return Path(cfg["out"]) / f"joint_{method}"


def joint_settings(cfg: dict) -> dict:
    """[train] < [joint], checked."""
    return JOINT.validate({**TRAIN.validate(cfg["train"]), **cfg.get("joint", {})}, cfg.get("_path", ""))


def _fresh_fusion(settings: dict, method: str, net: TwoStreamNetwork):
    dims = [head(s.net, s.arch).in_features for s in net.streams]
    return make_fusion(method, len(net.streams), len(net.class_names), dims, hidden=settings["hidden"],
                       dropout=settings["dropout"])


def _initial_fusion(cfg: dict, method: str, net: TwoStreamNetwork):
    """The fusion fitted heads-only by fuse-eval when there is one, learnable; else a fresh head."""
    from trainer.fusion import load_fitted

    path = Path(cfg["out"]) / "fusion" / "fusion.pt"
    n = len(net.streams)
    if path.is_file():
        fitted = load_fitted(path)
        if method in fitted["params"] and fitted["streams"] == cfg["fusion"]["streams"]:
            module = fusion_module(method, fitted["params"][method], n)
            if method == "weighted":
                module.a.requires_grad_(True)
            log.info(f"joint {method}: starting from the head fitted by fuse-eval ({path})")
            return module.train()
    return _fresh_fusion(cfg["fusion"], method, net)


def _stream_sets(net: TwoStreamNetwork, roots, ids, labels, counts, crop: int, **kw) -> list:
    return [ClipDataset(roots, ids, labels, counts, kind=s.kind, crop_size=crop, flow_length=s.flow_length, **kw)
            for s in net.streams]


def train_joint(cfg: Pipeline, method: str) -> dict:
    """Fine-tune the fusion.streams and the `method` fusion end to end; returns a summary.
    [joint] resume = true (--resume) continues a killed run from its last.pt."""
    cfg = require_pipeline(cfg, "train_joint")
    args = {"name": f"joint_{method}", **joint_settings(cfg), "freeze": "none", "section": "joint"}
    streams = list(cfg["fusion"]["streams"])
    cks = [C.load_best(cfg["out"], s) for s in streams]
    crop = int(cks[0].get("crop_size", args["crop_size"]))
    rank, world, local, device, joined = setup_process(args)
    seed = int(args["seed"])

    split = split_from_config(cfg)
    split_id = split_identity(split, cfg)
    for s, ck in zip(streams, cks):
        check_same_split(ck.get("split"), split_id, f"the {s} stream")
    store = Store(cfg["data"]["store"])
    net = TwoStreamNetwork.from_checkpoints(cks)
    net.fusion = _initial_fusion(cfg, method, net)
    reads = tuple(dict.fromkeys(m for s in net.streams for m in s.kind.reads))
    skip = cfg["data"]["skip_missing"]
    train_part, train_counts = check_videos(store, split.train, skip, "training ", reads)
    val_part, val_counts = check_videos(store, split.val, skip, "validation ", reads)
    net = net.to(device)
    root = str(store.root)
    train_set = JointDataset(_stream_sets(net, root, train_part.video_ids, train_part.labels, train_counts, crop,
                                          train=True), train=True, segments=args["segments"], seed=seed)
    val_set = JointDataset(_stream_sets(net, root, val_part.video_ids, val_part.labels, val_counts, crop,
                                        train=False), train=False, segments=args["segments"])
    loaders = training_loaders(train_set, val_set, int(args["batch_size"]), int(args["workers"]), device, seed, rank,
                               world)
    per_rank = int(args["batch_size"]) // world

    def logits_fn(model):
        def run(xs, y):
            b, k = xs[0].shape[:2]
            inputs = [x.to(device, non_blocking=True).flatten(0, 1) for x in xs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["amp"] and device.type == "cuda"):
                fused = model(*inputs)
            return torch.logsumexp(fused.float().view(b, k, -1), 1) - np.log(k)  # mean of the segments' probabilities
        return run

    run_dir = joint_dir(cfg, method)
    meta = {"kind": "joint", "fusion": method, "streams": streams, "class_names": list(net.class_names),
            "stream_meta": [{k: ck[k] for k in ("arch", "input", "flow_length", "mean_subtraction", "crop_size",
                                                "in_channels", "num_classes") if k in ck} for ck in cks],
            "split": split_id, "config": plain(cfg), "stream_config": plain(args)}
    if rank == 0:
        log.info(f"joint {method}: {' + '.join(streams)} on {device} x{world}, {len(train_part)} train / "
                 f"{len(val_part)} val videos; batch {args['batch_size']} = {per_rank} per process x {world}")
    identity = {"fusion": method, "streams": streams, "class_names": list(net.class_names)}
    # The fused loss: cross-entropy of the fused log-probabilities, the fused negative log-likelihood.
    summary = fit(net, [p for p in net.parameters() if p.requires_grad], loaders, device, args, run_dir, meta,
                  logits_fn, identity, rank=rank, world=world, local=local)
    if joined:
        dist.destroy_process_group()
    return summary


def load_joint(cfg: dict, method: str) -> tuple[TwoStreamNetwork, dict]:
    """The jointly fine-tuned network of a run (best epoch) and its checkpoint."""
    run_dir = joint_dir(cfg, method)
    C.repair(run_dir)
    ck = C.load_checkpoint(run_dir / C.BEST, f"the joint {method} model")
    metas = ck["stream_meta"]
    net = TwoStreamNetwork(len(ck["class_names"]), [(m["input"], m["arch"]) for m in metas], "average",
                           flow_length=int(metas[0]["flow_length"]))
    net.class_names = list(ck["class_names"])
    for s, m in zip(net.streams, metas):  # the architecture; the weights come from the checkpoint
        s.flow_length, s.mean_subtraction = int(m["flow_length"]), bool(m["mean_subtraction"])
        s.net = build_model(m["arch"], m["num_classes"], m["in_channels"], dropout=0.0)
    net.fusion = _fresh_fusion(cfg["fusion"], ck["fusion"], net)
    net.load_state_dict(ck["model"])
    return net.eval(), ck


@torch.no_grad()
def score_joint(cfg: Pipeline, method: str, part: str = "test", show: bool = True) -> Scores:
    """The test protocol through the joint network: fused probabilities averaged per video."""
    cfg = require_pipeline(cfg, "score_joint")
    net, ck = load_joint(cfg, method)
    split = split_from_config(cfg)
    split_id = split_identity(split, cfg)
    check_same_split(ck.get("split"), split_id, f"the joint {method} model")
    args = joint_settings(cfg)
    device = pick_device(args["device"])
    setup_device(device, args["threads"], args["deterministic"])
    net = net.to(device)
    store = Store(cfg["data"]["store"])
    reads = tuple(dict.fromkeys(m for s in net.streams for m in s.kind.reads))
    videos, counts = check_videos(store, split.part(part), cfg["data"]["skip_missing"], f"{part} ", reads)
    crop = int(ck["stream_meta"][0].get("crop_size", args["crop_size"]))
    ev = cfg["eval"]
    samples = JointDataset(_stream_sets(net, str(store.root), videos.video_ids, videos.labels, counts, crop,
                                        train=False), train=False, samples=ev["segments"], crops=ev["crops"])
    loader = make_loader(samples, range(len(samples)), int(ev["batch_size"]), int(args["workers"]), device)
    n, k_cls = len(videos), len(ck["class_names"])
    sums = torch.zeros(n, k_cls, dtype=torch.float64, device=device)
    counts_t = torch.zeros(n, dtype=torch.float64, device=device)
    with Progress(len(loader), f"joint {method} {part} (test protocol)", unit="batches", show=show) as bar:
        for xs, j in loader:
            b, c = xs[0].shape[:2]
            fused = net(*[x.to(device).flatten(0, 1) for x in xs]).float().softmax(-1).view(b, c, -1).mean(1)
            j = j.to(device)
            sums.index_add_(0, j, fused.double())
            counts_t.index_add_(0, j, torch.ones_like(j, dtype=torch.float64))
            bar.update(1)
    probs = (sums / counts_t.clamp(min=1)[:, None]).cpu().numpy()
    meta = {"stream": f"joint_{method}", "checkpoint_epoch": C.epoch_of(ck), "part": part, "split": split_id,
            "segments": ev["segments"], "crops": ev["crops"], "store": str(cfg["data"]["store"])}
    scores = Scores(videos.video_ids, videos.labels, list(ck["class_names"]), probs, meta)
    save_scores(scores_file(joint_dir(cfg, method), part), scores)
    return scores

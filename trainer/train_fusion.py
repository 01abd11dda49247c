"""`python -m trainer train-fusion`: train one fusion, heads only or jointly with the streams.

    python -m trainer train-fusion --pipeline P --fusion attention           # heads only
    python -m trainer train-fusion --pipeline P --fusion attention --joint   # end to end
    torchrun --nproc-per-node 8 -m trainer train-fusion --pipeline P --fusion attention --joint

Heads only: the fusion is fitted on the streams' per-video scores and pooled features of the
training part (the test protocol's sampling, computed once with the streams frozen and cached
as score files), with the validation part for early stopping; this is what fuse-eval does for
every method, so this command is fuse-eval restricted to one method.

Joint (--joint): a TwoStreamNetwork is built from the separately trained streams' best.pt and
the fusion fitted heads-only (fusion/fusion.pt, when fuse-eval has run; a fresh head
otherwise), then everything is fine-tuned under the fused loss on aligned samples of the
streams (data.JointDataset), with the training loop of trainer/train.py: [train] settings,
overridden by [joint] (use a small lr: the streams are trained already). The run folder
{out}/joint_<fusion>/ holds last.pt / best.pt / log.jsonl like a stream's, and its scores of
the test protocol, which fuse-eval reports as "<fusion> (joint)".
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flowprep.store import Store
from trainer import checkpoint as C
from trainer.config import JOINT, TRAIN
from trainer.data import ClipDataset, JointDataset, make_loader, training_loaders
from trainer.models import build_model, freeze_bn, head
from trainer.network import TwoStreamNetwork, fusion_module, make_fusion
from trainer.scores import Scores, save_scores, scores_file
from trainer.splits import check_same_split, check_videos, split_from_config, split_identity
from trainer.train import _plain, evaluate, make_optimizer, make_scheduler, train_one_epoch
from trainer.utils import init_distributed, pick_device, seed_everything, setup_device
from twostream.pipeline import validate
from twostream.progress import Progress
from twostream.schema import ConfigError

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


def train_joint(cfg: dict, method: str) -> dict:
    """Fine-tune the fusion.streams and the `method` fusion end to end; returns a summary."""
    cfg = validate(cfg)
    args = {"name": f"joint_{method}", **joint_settings(cfg)}
    streams = list(cfg["fusion"]["streams"])
    cks = [C.load_best(cfg["out"], s) for s in streams]
    crop = int(cks[0].get("crop_size", args["crop_size"]))
    joined = not dist.is_initialized()
    rank, world, local = init_distributed(args["device"])
    joined = joined and dist.is_initialized()
    device = pick_device(args["device"], local)
    setup_device(device, args["threads"], args["deterministic"])
    seed = int(args["seed"])
    seed_everything(seed + rank)

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
    try:
        sampler, loader, val_loader = training_loaders(train_set, val_set, int(args["batch_size"]),
                                                       int(args["workers"]), device, seed, rank, world)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    per_rank = int(args["batch_size"]) // world
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], args)
    scheduler = make_scheduler(optimizer, args, len(loader))
    criterion = nn.CrossEntropyLoss()  # on fused log-probabilities: the fused negative log-likelihood
    net_ddp = nn.parallel.DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None) \
        if world > 1 else net

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
            "split": split_id, "config": _plain(cfg), "stream_config": _plain(args)}
    if rank == 0:
        C.start_run(run_dir)
        log.info(f"joint {method}: {' + '.join(streams)} on {device} x{world}, {len(train_part)} train / "
                 f"{len(val_part)} val videos; batch {args['batch_size']} = {per_rank} per process x {world}")
    records, best_acc, best_epoch = [], -1.0, None
    for epoch in range(int(args["epochs"])):
        sampler.set_epoch(epoch)
        record = {"epoch": epoch + 1}
        record.update(train_one_epoch(net_ddp, criterion, optimizer, scheduler, loader, device, epoch,
                                      {**args, "freeze": "none"}, logits_fn(net_ddp), show=rank == 0))
        if args["freeze_bn"]:
            freeze_bn(net)
        if val_loader is not None:
            record.update(evaluate(net, criterion, val_loader, device, logits_fn(net)))
        best_acc, best_epoch = C.commit_epoch(
            run_dir, epoch, record, (best_acc, best_epoch), val_loader is not None, records, world, rank,
            lambda: {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, meta)
        if rank == 0:
            log.info(f"joint {method} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                                     if k != "epoch"))
    if world > 1:
        dist.barrier()
    if joined:
        dist.destroy_process_group()
    return {"out": str(run_dir), "best_acc": best_acc, "log": records}


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
def score_joint(cfg: dict, method: str, part: str = "test", show: bool = True) -> Scores:
    """The test protocol through the joint network: fused probabilities averaged per video."""
    cfg = validate(cfg)
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
    meta = {"stream": f"joint_{method}", "checkpoint_epoch": int(ck["epoch"]), "part": part, "split": split_id,
            "segments": ev["segments"], "crops": ev["crops"], "store": str(cfg["data"]["store"])}
    scores = Scores(videos.video_ids, videos.labels, list(ck["class_names"]), probs, meta)
    save_scores(scores_file(joint_dir(cfg, method), part), scores)
    return scores

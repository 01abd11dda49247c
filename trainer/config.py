"""The trainer's pipeline sections: [train] (and each [streams.NAME]), [eval], [fusion], [joint], [ablate]
([data] is core/data.py's: flowprep reads it too).

Each section is one schema (core.schema): keys, types, ranges, defaults and help, read by
the pipeline loader (twostream.pipeline), the validation and the command-line options alike.
This module imports neither torch nor the models, so `python -m twostream --help` stays fast.

A stream's settings are the [train] defaults overridden by its own [streams.NAME] section
(`stream_settings`); `spatial` (input rgb) and `temporal` (input flow) always exist, and older
pipelines' [spatial] / [temporal] sections are those two streams' sections.
"""
from __future__ import annotations

from core.schema import ConfigError, Invalid, Key, Section, boolean, int_list, integer, names, number, number_list
from flowprep.flow import ALGOS
from trainer.streams import DEFAULT_STREAMS, INPUTS, check_length, get_input

# --stream rgb|flow, as MMAction2 users name the two streams.
STREAM_ALIASES = {"rgb": "spatial", "flow": "temporal"}


def _resume(v):
    """true/false, or the path of a checkpoint to continue from."""
    if isinstance(v, bool) or (isinstance(v, str) and v not in ("true", "false", "yes", "no")):
        return v
    raise Invalid("true, false, or a checkpoint path in quotes")


def _check_train(v: dict) -> None:
    if v["lr_steps"] != sorted(v["lr_steps"]):
        raise ConfigError(f"lr_steps = {v['lr_steps']}: epochs must be in increasing order")


TRAIN_KEYS = {
    "arch": Key("resnet18", "Backbone: resnet18/34/50/101/152, vgg11_bn, vgg16, vgg16_bn, vgg19_bn or cnn_m_2048 "
                "(the paper's CNN-M-2048)."),
    "pretrained": Key("", "Local weights file: a torchvision ImageNet state_dict, one of our checkpoints, or an "
                      "MMAction2/mmengine checkpoint (never downloaded). Flow inputs get the cross-modality init.",
                      metavar="PATH"),
    "freeze": Key("none", "none: fine-tune everything; backbone: train the last layer only (paper sec. 4).",
                  choices=("none", "backbone")),
    "epochs": Key(10, "Training epochs.", integer, min=1),
    "batch_size": Key(32, "Global batch size: split across the processes of a torchrun job, so the learning rate "
                      "does not depend on the GPU count.", integer, min=1, flags=("--batch-size", "-b")),
    "lr": Key(0.001, "Learning rate.", number, above=0),
    "optimizer": Key("sgd", "sgd (with momentum) or adamw.", choices=("sgd", "adamw")),
    "momentum": Key(0.9, "SGD momentum.", number, min=0, max=0.999, flags=None),
    "weight_decay": Key(5e-4, "Weight decay.", number, min=0, flags=None),
    "schedule": Key("step", "step: x lr_gamma at each epoch in lr_steps; cosine: to zero at the last epoch; "
                    "constant.", choices=("step", "cosine", "constant")),
    "lr_steps": Key([6, 9], "Epochs at which the step schedule multiplies the learning rate by lr_gamma.",
                    int_list, min=1, flags=None),
    "lr_gamma": Key(0.1, "Step schedule factor.", number, above=0, flags=None),
    "warmup_epochs": Key(0.0, "Linear learning-rate warmup, in epochs.", number, min=0, flags=None),
    "dropout": Key(0.5, "Dropout before the classifier.", number, min=0, max=0.99, flags=None),
    "best_by": Key("val_acc", "The epoch kept as best.pt: val_acc (highest validation accuracy) or val_loss (lowest "
                   "validation loss: better when accuracy cannot tell the epochs apart, as with a small validation "
                   "part or classes a stream cannot separate, and it prefers the epoch whose probabilities are the "
                   "most honest, which fusion averages). Ties go to the earlier epoch.",
                   choices=("val_acc", "val_loss"), flags=None),
    "workers": Key(4, "Data loader worker processes per GPU.", integer, min=0, flags=("--workers", "-j")),
    "device": Key("auto", "auto, cpu, cuda or cuda:N."),
    "amp": Key(True, "bfloat16 autocast on CUDA (no effect on the CPU).", boolean),
    "seed": Key(0, "Random seed: with the same seed, threads and machine, a run gives the same weights.",
                integer, min=0),
    "threads": Key(0, "CPU threads of torch's own ops (0 = its default, one per core). CPU results depend on "
                   "it (reductions split differently): fix it to get the same numbers on another machine.",
                   integer, min=0, flags=None),
    "deterministic": Key(False, "Deterministic algorithms only (cuDNN autotuning off): the same numbers on every "
                         "run of a GPU too, a little slower.", boolean, flags=None),
    "crop_size": Key(224, "Training crop side (test crops come from the short side scaled to 256/224 of it).",
                     integer, min=8, flags=None),
    "segments": Key(1, "TSN segments per training sample (1 = the paper's single frame or stack).", integer, min=1,
                    flags=None),
    "clip_grad": Key(0.0, "Gradient norm clipping (0 = off).", number, min=0, flags=None),
    "freeze_bn": Key(False, "Keep BatchNorm layers on their running statistics.", boolean, flags=None),
    "flow_length": Key(10, "L: flows per stack (flow inputs), or L+1 frames (rgb_stack, rgb_diff).", integer, min=1,
                       flags=None),
    "mean_subtraction": Key(True, "Flow inputs: subtract each flow field's mean (camera-motion compensation).",
                            boolean, flags=None),
    "resume": Key(False, "Continue from <out>/<stream>/last.pt (true) or from the checkpoint at this path.",
                  _resume, flags=None),
    "print_freq": Key(10, "Steps between status updates.", integer, min=1, flags=None),
    "datasets": Key([], "Multi-task training (paper sec. 4.1): the [datasets.NAME] to train on at once, one "
                    "softmax head each, each video's loss on its own head; empty = the [data] dataset.", names,
                    flags=None),
}
TRAIN = Section("train", TRAIN_KEYS, _check_train, "Training settings shared by every stream.")


JOINT = Section("joint", TRAIN_KEYS, _check_train, "train-fusion --joint: [train] keys it sets differently "
                "(a small lr: the streams are trained already).")


def _check_stream(v: dict) -> None:
    _check_train(v)
    try:
        check_length(get_input(v["input"]), v["flow_length"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


STREAM = Section("streams.NAME", {
    "input": Key("rgb", "What the stream sees: " + "; ".join(f"{k}: {i.doc}" for k, i in INPUTS.items()) + ".",
                 choices=tuple(INPUTS), flags=None),
    **TRAIN_KEYS}, _check_stream, "One stream: its input kind and any [train] key it sets differently.")

EVAL = Section("eval", {
    "segments": Key(25, "Evenly spaced frames / stacks per video in the test protocol.", integer, min=1),
    "crops": Key("center", "center: one centre crop; ten: corners and centre, and their mirrors.",
                 choices=("center", "ten")),
    "batch_size": Key(32, "Samples per evaluation batch.", integer, min=1),
}, doc="The paper's test protocol.")

FUSION = Section("fusion", {
    "streams": Key(["spatial", "temporal"], "The streams to fuse, in order.", names),
    "dataset": Key("", "With multi-task streams: the [datasets.NAME] to fuse on (each such stream is scored "
                   "with that dataset's head; the others must be trained on its split).", flags=("--dataset",)),
    "methods": Key(["average", "calibrated", "weighted", "svm", "learned", "feature", "attention"],
                   "Fusion methods to compare (see trainer/fusion.py).", names),
    "weights": Key([], "Weighted fusion's weights, one per stream; empty = chosen on the validation part.",
                   number_list, min=0),
    "svm_c": Key(1.0, "Linear SVM fusion's C.", number, above=0),
    "hidden": Key(128, "Hidden width of the learned, feature and attention fusion heads.", integer, min=1),
    "dropout": Key(0.2, "Dropout in the fusion heads.", number, min=0, max=0.9),
    "head_epochs": Key(300, "Full-batch training steps of a fusion head on the per-video scores / features.",
                       integer, min=1),
    "head_lr": Key(0.003, "Learning rate of the fusion heads (AdamW).", number, above=0),
    "head_weight_decay": Key(0.01, "Weight decay of the fusion heads.", number, min=0),
    "patience": Key(30, "Stop a head's training after this many steps without a better validation loss.",
                    integer, min=1),
    "seed": Key(0, "Seed of the fusion heads' initialisation.", integer, min=0),
}, doc="Late fusion of the streams' scores.")


ABLATE = Section("ablate", {
    "lengths": Key([1, 5, 10], "Flow stack lengths L compared (each with and without mean subtraction).", int_list,
                   min=1),
    "algos": Key(["tvl1", "farneback", "dis", "deepflow", "lk"], "Flow algorithms compared for the temporal stream "
                 "(each extracted once into <store>-<algo>).", names, choices=ALGOS),
    "rgb_stack_length": Key(10, "L of the rgb_stack cell (L+1 frames).", integer, min=1),
    "pretrained": Key("", "Weights for the spatial fine-tuned / last-layer cells [default: train.pretrained]."),
    "epochs": Key(0, "Epochs of every cell (0 = each stream's own).", integer, min=0),
}, doc="python -m twostream ablate: the paper's input comparisons.")


def stream_names(cfg: dict) -> list[str]:
    """The streams a pipeline defines: spatial and temporal always, then its own."""
    return list(dict.fromkeys([*DEFAULT_STREAMS, *cfg.get("streams", {})]))


def resolve_stream(cfg: dict, name: str) -> str:
    """A stream's name as the pipeline knows it (`rgb` / `flow` stand for spatial / temporal)."""
    known = stream_names(cfg)
    if name in known:
        return name
    if name in STREAM_ALIASES:
        return STREAM_ALIASES[name]
    raise ConfigError(f"unknown stream {name!r}; this pipeline defines {', '.join(known)} "
                      "(add a [streams.NAME] section with an input to define another)")


def stream_settings(cfg: dict, name: str) -> dict:
    """Schema defaults < [train] < [streams.NAME], checked; includes `name` and `input`."""
    name = resolve_stream(cfg, name)
    own = dict(cfg.get("streams", {}).get(name, {}))
    own.setdefault("input", DEFAULT_STREAMS.get(name, "rgb"))
    values = {**TRAIN.validate(cfg.get("train", {}), cfg.get("_path", "")), **own}
    settings = {"name": name, **STREAM.validate(values, cfg.get("_path", ""))}
    unknown = [d for d in settings["datasets"] if d not in cfg.get("datasets", {})]
    if unknown:
        raise ConfigError(f"streams.{name}.datasets names {', '.join(unknown)}, but the pipeline defines no "
                          f"[datasets.{unknown[0]}] section (with store and splits)")
    return settings

"""One process per GPU that solves batches of frame pairs for the CPU tasks around it.

With `flowprep extract --device cuda --backend ray`, Ray starts one `FlowService` actor per GPU
(`num_gpus=1`). The per-video tasks keep their one CPU core each for the work that does not
belong on the GPU (decode, resize, grey conversion, quantize, JPEG encode, write) and send
their frame pairs to a service in batches, so decoding and encoding of many videos overlap with
the GPU's TV-L1 instead of waiting for it. One process owns each GPU: the CUDA solver is neither
cheap to share nor deterministic under threads, and one copy of its compiled kernels suffices.
"""
from __future__ import annotations

import numpy as np

from flowprep.flow import GPU_BATCH, make_flow_batch


class FlowService:
    """Holds a batched TV-L1 on one device; `flow(prevs, nexts)` -> list of float32 HxWx2 flows."""

    def __init__(self, algo: str, preset: str, device: str):
        self.solve, self.batch = make_flow_batch(algo, preset, device)

    def flow(self, prevs: np.ndarray, nexts: np.ndarray) -> list[np.ndarray]:
        return self.solve(list(prevs), list(nexts))


def service_flow_batch(service):
    """The (flow_batch, batch) pair `extract_video` takes, forwarding each batch to a Ray actor."""
    import ray

    def run(prevs: list, nexts: list) -> list:
        return ray.get(service.flow.remote(np.stack(prevs), np.stack(nexts)))

    return run, GPU_BATCH


def start_services(ray, opts) -> list:
    """One FlowService per GPU of the cluster ('torch-cpu': one on a CPU, for tests without a GPU)."""
    if opts.device == "torch-cpu":
        count, gpus = 1, 0
    else:
        count, gpus = int(ray.cluster_resources().get("GPU", 0)), 1
        if count == 0:
            raise RuntimeError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    # num_cpus=0: the service mostly waits on its device, and must not take a core from the tasks
    # that feed it (with every core busy feeding, a service needing one could never start).
    # max_restarts / max_task_retries: a service that dies is restarted and its batches re-sent.
    cls = ray.remote(num_cpus=0, num_gpus=gpus, max_restarts=3, max_task_retries=3)(FlowService)
    return [cls.remote(opts.algo, opts.preset, opts.device) for _ in range(count)]

"""One process per GPU that solves the frame pairs of all the CPU tasks around it, batched continuously.

With `flowprep extract --device cuda --backend ray`, Ray starts one `FlowService` actor per GPU
(`num_gpus=1`). The per-video tasks keep their one CPU core each for the work that does not
belong on the GPU (decode, resize, grey conversion, quantize, JPEG encode, write) and send
their frame pairs to a service in batches, so decoding and encoding of many videos overlap with
the GPU's TV-L1 instead of waiting for it.

Continuous batching across videos: the actor is threaded (`max_concurrency`), so the `flow` calls
of several tasks are in it at once. A call only queues its pairs on the one shared
`ContinuousTVL1` (flowprep/tvl1_torch.py) and waits for them; a single worker thread drives that
solver. Pairs of every video share the device's launches: a pair that converges leaves, and the
next pair, from whichever video, takes its place, so one video's slow (high-motion) pair holds up
neither the rest of its own batch nor anyone else's. One thread does all the device work, so there
is one copy of the compiled kernels and nothing on the device runs concurrently. Each flow is bit
for bit what `tvl1` computes for its pair alone, so a store written through the service is the
store that per-process torch flow writes.
"""
from __future__ import annotations

import threading

import numpy as np

from flowprep.flow import GPU_BATCH, FlowSpec, check_device

# Calls served at once per actor: each running task has at most one call in flight, and past a
# few hundred queued pairs (the solver holds 4 * GPU_BATCH on the device) more callers only wait.
MAX_CALLS = 64


class FlowService:
    """The torch TV-L1 of one device, shared by concurrent callers: `flow(prevs, nexts)` -> HxWx2 flows.

    spec.device: 'cuda', 'cuda:N', or 'torch-cpu' (the same code on the CPU, for tests without a GPU).
    """

    def __init__(self, spec: FlowSpec, batch_size: int = GPU_BATCH):
        import torch

        from flowprep.tvl1_continuous import ContinuousTVL1

        device = spec.device
        check_device(spec.algo, device)
        if device == "cpu":
            raise ValueError("FlowService runs the torch TV-L1: use device 'cuda' or 'torch-cpu' "
                             "(with --device cpu each task runs OpenCV itself and needs no service)")
        if device == "torch-cpu":
            device = "cpu"
            torch.set_num_threads(1)  # as the per-process torch-cpu path: results do not depend on it
        self._solver = ContinuousTVL1(batch_size, device, **spec.params)
        self._wake = threading.Event()
        threading.Thread(target=self._drive, name="tvl1-solver", daemon=True).start()

    def flow(self, prevs: np.ndarray, nexts: np.ndarray) -> list[np.ndarray]:
        """Flow for each (prevs[i], nexts[i]) grayscale pair, float32 HxWx2; returns when all are done."""
        if len(prevs) != len(nexts):
            raise ValueError(f"FlowService.flow: {len(prevs)} prev frames but {len(nexts)} next frames")
        futures = [self._solver.submit(a, b) for a, b in zip(prevs, nexts)]
        self._wake.set()
        return [f.result().permute(1, 2, 0).cpu().numpy() for f in futures]

    def _drive(self) -> None:
        """The one thread that touches the device: step while pairs are in flight, else sleep."""
        while True:
            try:
                busy = self._solver.step()
            except Exception as e:  # e.g. out of device memory: fail the callers instead of hanging them
                self._solver.fail(e)
                busy = False
            if not busy:
                self._wake.wait()  # set by every flow() after it queued its pairs
                self._wake.clear()


def service_flow_batch(service):
    """The (flow_batch, batch) pair `extract_video` takes, forwarding each batch to a Ray actor."""
    import ray

    def run(prevs: list, nexts: list) -> list:
        return ray.get(service.flow.remote(np.stack(prevs), np.stack(nexts)))

    run.engine_used = lambda: "torch"
    return run, GPU_BATCH


def start_services(ray, spec: FlowSpec) -> list:
    """One FlowService per GPU of the cluster ('torch-cpu': one on a CPU, for tests without a GPU)."""
    if spec.device == "torch-cpu":
        count, gpus = 1, 0
    else:
        count, gpus = int(ray.cluster_resources().get("GPU", 0)), 1
        if count == 0:
            raise RuntimeError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    # num_cpus=0: the service mostly waits on its device, and must not take a core from the tasks
    # that feed it (with every core busy feeding, a service needing one could never start).
    # max_restarts / max_task_retries: a service that dies is restarted and its batches re-sent.
    # max_concurrency: the calls of concurrent tasks meet in one solver (see the module docstring).
    calls = max(2, min(MAX_CALLS, int(ray.cluster_resources().get("CPU", 1))))
    cls = ray.remote(num_cpus=0, num_gpus=gpus, max_restarts=3, max_task_retries=3, max_concurrency=calls)(FlowService)
    return [cls.remote(spec) for _ in range(count)]

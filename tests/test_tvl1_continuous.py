"""Continuous batching of the torch TV-L1 (ContinuousTVL1, tvl1_stream, the FlowService actor):
each pair's flow is bit for bit the fixed-batch flow, whatever joins or leaves the device batch
around it, and a slow pair holds up nobody: the other pairs finish first, in fewer sequential steps
than fixed batches take for the same stream."""

import threading

import numpy as np
import pytest
import torch

from flowprep.flow import flow_spec
from flowprep.presets import TVL1_PRESETS as PRESETS
from flowprep.tvl1_continuous import ContinuousTVL1, tvl1_stream
from flowprep.tvl1_torch import TVL1Stats, tvl1
from test_tvl1_torch import _bikes_gray

# Accurate, on a 2-level pyramid with 2 warps so tests stay fast: at 64x48 bikes 100-101 runs into the
# 1200-iteration cap and 97-98 stops after 840, the other pairs here after 125-300, a static pair after 4.
PARAMS = dict(PRESETS["accurate"], nscales=2, warps=2)
SLOW, SLOW2 = (100, 101), (97, 98)
OTHERS = [(0, 1), (50, 51), (120, 121), (60, 60), (160, 161), (140, 141), (10, 11)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pairs(size: tuple[int, int], which: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    idx = sorted({i for p in which for i in p})
    frames = dict(zip(idx, _bikes_gray(size, idx)))
    return [(torch.from_numpy(frames[a]), torch.from_numpy(frames[b])) for a, b in which]


def _fixed(pairs, batch: int, stats: TVL1Stats | None = None) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        out += list(tvl1(torch.stack([a for a, _ in chunk]), torch.stack([b for _, b in chunk]), stats=stats, **PARAMS))
    return out


@pytest.mark.slow
def test_continuous_equals_fixed_batches_bit_for_bit():
    """Pairs of two videos of different sizes: 80x60's second level is 64x48, the first level of the
    others, so their pairs share launches there. A small batch and a small in-flight cap make pairs
    wait, join mid-stream, and meet different batch-mates at every level."""
    pairs = _pairs((64, 48), [SLOW] + OTHERS[:4]) + _pairs((80, 60), [(0, 1), SLOW, (120, 121)])
    solver = ContinuousTVL1(batch_size=3, max_pairs=5, **PARAMS)
    futures = [solver.submit(a, b) for a, b in pairs]
    solver.run()
    assert all(f.done() for f in futures) and solver.in_flight() == 0
    for i, (f, (a, b)) in enumerate(zip(futures, pairs)):
        assert torch.equal(f.result(), tvl1(a, b, **PARAMS)), i
    small = [f.result() for f in futures[:5]]
    assert all(torch.equal(x, y) for x, y in zip(small, _fixed(pairs[:5], batch=4)))
    assert solver.stats.pairs == len(pairs)
    assert solver.stats.live_iterations <= solver.stats.slot_iterations


def test_slow_pair_holds_up_nobody():
    """Fixed batches of 4 run 1200 + 840 sequential steps, each batch held by its slow pair; continuous
    batching runs the two slow pairs side by side and everyone else around them."""
    pairs = _pairs((64, 48), [SLOW] + OTHERS[:3] + [SLOW2] + OTHERS[3:6])
    fixed_stats = TVL1Stats()
    fixed = _fixed(pairs, batch=4, stats=fixed_stats)

    solver = ContinuousTVL1(batch_size=4, **PARAMS)
    done_at = {}
    futures = [solver.submit(a, b) for a, b in pairs]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _, i=i: done_at.__setitem__(i, solver.stats.steps))
    solver.run()
    assert all(torch.equal(f.result(), x) for f, x in zip(futures, fixed))
    assert sorted(done_at, key=done_at.get)[-2:] == [4, 0], done_at  # the slow pairs finish last
    assert solver.stats.live_iterations == fixed_stats.live_iterations  # the same work...
    assert solver.stats.steps < 0.85 * fixed_stats.steps, (solver.stats, fixed_stats)  # ...in fewer steps
    others = [done_at[i] for i in range(len(pairs)) if i not in (0, 4)]
    assert max(others) < 0.5 * fixed_stats.steps, (others, fixed_stats)  # and nobody waited for them


def test_stream_yields_each_pair_once_as_it_finishes():
    pairs = _pairs((64, 48), [SLOW] + OTHERS[:3])
    got = list(tvl1_stream(iter(pairs), batch_size=2, **PARAMS))
    assert sorted(i for i, _ in got) == list(range(len(pairs)))
    assert got[-1][0] == 0  # the slow pair comes out last although it went in first
    for i, flow in got:
        assert torch.equal(flow, tvl1(*pairs[i], **PARAMS)), i


def test_flow_service_merges_concurrent_callers():
    """The FlowService actor's body without Ray: callers in threads (as Ray's threaded actor runs
    them) share one solver, and each gets exactly its own pairs' flows, as HxWx2 float32."""
    from flowprep.flow_service import FlowService

    service = FlowService(flow_spec("tvl1", "fast", "torch-cpu"))
    videos = [_pairs((64, 48), [(0, 1), (1, 2), (2, 3)]), _pairs((64, 48), [SLOW, (99, 100)]),
              _pairs((80, 60), [(50, 51), (120, 121)])]
    results: dict[int, list] = {}

    def call(k: int) -> None:
        prevs = np.stack([a.numpy() for a, _ in videos[k]])
        nexts = np.stack([b.numpy() for _, b in videos[k]])
        prevs.setflags(write=False)  # Ray hands actors read-only arrays
        results[k] = service.flow(prevs, nexts)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(videos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1, 2]
    for k, pairs in enumerate(videos):
        for (a, b), flow in zip(pairs, results[k]):
            assert flow.dtype == np.float32 and flow.shape == (*a.shape, 2)
            assert np.array_equal(flow, tvl1(a, b, **PRESETS["fast"]).permute(1, 2, 0).numpy())


def test_solver_failure_reaches_the_callers():
    """A device error in the solver thread (say, out of memory) must fail the waiting calls, not hang them."""
    from flowprep.flow_service import FlowService

    service = FlowService(flow_spec("tvl1", "fast", "torch-cpu"))

    def broken_step() -> bool:
        raise RuntimeError("CUDA out of memory (simulated)")

    service._solver._admit = broken_step
    prev, nxt = _bikes_gray((64, 48), [0, 1])
    with pytest.raises(RuntimeError, match="simulated"):
        service.flow(prev[None], nxt[None])
    assert service._solver.in_flight() == 0


def test_bad_submissions_raise_value_error_naming_the_problem():
    solver = ContinuousTVL1(batch_size=2, **PARAMS)
    with pytest.raises(ValueError, match=r"\(48, 64\) and \(48, 60\)"):
        solver.submit(torch.zeros(48, 64), torch.zeros(48, 60))
    with pytest.raises(ValueError, match=r"\(2, 48, 64\).*gray"):
        solver.submit(torch.zeros(2, 48, 64), torch.zeros(2, 48, 64))  # one pair per submit
    with pytest.raises(ValueError, match="batch_size"):
        ContinuousTVL1(batch_size=0)
    with pytest.raises(ValueError, match="warp"):
        ContinuousTVL1(batch_size=2, warp=3)  # misspelt parameter
    assert solver.in_flight() == 0

"""Continuous batching for the torch TV-L1 (flowprep/tvl1_torch.py): pairs enter and leave the
device batches one by one, so one slow pair holds up nobody.

Continuous batching (`ContinuousTVL1`, `tvl1_stream`): the unit of work is (pair, pyramid level,
warp). Pairs at the same level size share one device batch, whatever video they come from and
whichever warp each is at; a pair that finishes a warp leaves the batch and rejoins for the next
warp, moves on to the next finer level's batch, or is done, and new pairs enter at the coarsest
level. A batch is rebuilt (leavers out, waiting pairs in) once a quarter of it would change or
after one iteration block (inner_iterations steps), so its rebuild copies stay a small share of the
work. Each step iterates the level whose pairs have waited the most pair-steps (pairs x steps since
it last ran): launches are as full as the pairs in flight allow, and a slow pair alone at its level
still progresses without holding anyone up. Results are those of `tvl1`, bit for bit.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

import numpy as np
import torch

from flowprep.tvl1_torch import (DEFAULTS, Level, TVL1Stats, build_pyramid, check_frames, check_params, gradient_stack,
                                 make_kernels, make_level, pyramid_sizes, upsample_flow, warn_compile, warp_terms)


class _Pair:
    """One submitted pair's progress: pyramid, position (level, warp, outer, inner) and state."""

    __slots__ = ("seq", "future", "sizes", "i0s", "i1s", "level", "warp", "outer", "inner", "entering",
                 "u", "p", "stack")

    def __init__(self, seq: int, future: Future, prev: torch.Tensor, next: torch.Tensor):
        self.seq, self.future = seq, future
        self.i0s, self.i1s = prev, next  # full-size frames until admitted, then the pyramids
        self.sizes: list = []
        self.level = self.warp = self.outer = self.inner = 0
        self.entering = True  # needs the level's gradient stack (and its u from the coarser level)
        self.u = self.p = self.stack = None


class _Group:
    """The pairs at one level size: a device batch (slots) and the pairs waiting to join it."""

    def __init__(self, lv: Level, now: int):
        self.lv = lv
        self.slots: list[_Pair] = []
        self.live: list[bool] = []
        self.pending: list[_Pair] = []
        self.tensors: tuple | None = None  # u, p, i1w_grad, grad, rho_c of the slots
        self.live_mask: torch.Tensor | None = None
        self.since_rebuild = 0
        self.last_run = now  # stats.steps when it last ran (or was created)

    @property
    def n_live(self) -> int:
        return sum(self.live)


class ContinuousTVL1:
    """TV-L1 for a stream of frame pairs on one device, batched continuously (module docstring).

    `submit(prev, next)` returns a `concurrent.futures.Future` of the (2,H,W) float32 flow on the
    device; `step()` runs one batched inner iteration (False when there is nothing to do) and `run()`
    steps until every submitted pair is done. Each pair's flow is bit for bit `tvl1(prev, next)`'s.
    Any thread may submit; one thread at a time may step (the FlowService actor's worker thread).

    batch_size: most pairs in one launch. max_pairs: most pairs on the device at once, spread over
    the pyramid levels (default 4 * batch_size, so each level size usually has a full launch's
    worth); their pyramids and state are what takes device memory. Submitted pairs beyond it wait
    on the host, in order.
    """

    def __init__(self, batch_size: int = 32, device: str | torch.device = "cpu", *, max_pairs: int | None = None,
                 compile: bool | None = None, **params):
        p = dict(DEFAULTS, **params)
        check_params(p)
        max_pairs = 4 * batch_size if max_pairs is None else max_pairs
        for name, v in (("batch_size", batch_size), ("max_pairs", max_pairs)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"ContinuousTVL1: {name} must be an integer >= 1, got {v!r}")
        self.batch_size, self.max_pairs = int(batch_size), int(max_pairs)
        self.device = torch.device(device)
        self.params = p
        self._compile = self.device.type == "cuda" if compile is None else compile
        self._kernels = make_kernels(self._compile)
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Pair] = collections.deque()
        self._seq = 0
        self._active: list[_Pair] = []
        self._groups: dict[tuple[int, int], _Group] = {}
        self.stats = TVL1Stats()

    # ----- public

    def submit(self, prev: torch.Tensor | np.ndarray, next: torch.Tensor | np.ndarray) -> Future:
        """Queue one (H,W) grayscale pair (uint8 or float on 0..255, any device); returns its Future."""
        prev, next = (torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x for x in (prev, next))
        check_frames(prev, next, "ContinuousTVL1.submit", batch=False)
        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._waiting.append(_Pair(self._seq, future, prev, next))
            self._seq += 1
        return future

    def in_flight(self) -> int:
        """Pairs submitted and not finished yet (waiting or on the device)."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    def step(self) -> bool:
        """One batched inner iteration of the group chosen next; False when no pair is in flight."""
        with torch.no_grad():
            self._admit()
            while self._active:
                g = self._choose()
                if self._needs_rebuild(g):
                    self._rebuild(g)
                if g.n_live:
                    self._iterate(g)
                    return True
            return False

    def run(self) -> None:
        """Step until every submitted pair is done."""
        while self.step():
            pass

    def fail(self, exc: BaseException) -> None:
        """Fail every pair in flight with `exc` and forget them (after `step` raised, e.g. out of memory)."""
        with self._lock:
            pairs = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        self._groups.clear()
        for q in pairs:
            if not q.future.done():
                q.future.set_exception(exc)

    # ----- scheduling

    def _group(self, hw: tuple[int, int]) -> _Group:
        g = self._groups.get(hw)
        if g is None:
            p = self.params
            g = self._groups[hw] = _Group(make_level(hw, self.device, p["tau"], p["lambda_"], p["theta"], p["epsilon"]),
                                          self.stats.steps)
        return g

    def _admit(self) -> None:
        """Waiting pairs take the free places, entering at their coarsest level."""
        with self._lock:
            new = []
            while self._waiting and len(self._active) + len(new) < self.max_pairs:
                new.append(self._waiting.popleft())
            self._active += new
        p = self.params
        by_size: dict = {}
        for q in new:
            by_size.setdefault(tuple(q.i0s.shape), []).append(q)
        for (h, w), qs in by_size.items():  # one batched pyramid per frame size
            sizes = pyramid_sizes(h, w, p["nscales"], p["scale_step"])
            i0 = torch.stack([q.i0s.to(self.device) for q in qs]).to(torch.float32)
            i1 = torch.stack([q.i1s.to(self.device) for q in qs]).to(torch.float32)
            i0s, i1s = build_pyramid(i0, sizes, p["scale_step"]), build_pyramid(i1, sizes, p["scale_step"])
            for j, q in enumerate(qs):
                q.sizes = sizes
                q.i0s, q.i1s = [t[j] for t in i0s], [t[j] for t in i1s]
                q.level = len(sizes) - 1
                q.u = torch.zeros(2, *sizes[-1], device=self.device, dtype=torch.float32)
                self._group(sizes[-1]).pending.append(q)

    def _choose(self) -> _Group:
        """The group to iterate: the one whose pairs have waited the most pair-steps since it last ran
        (its pairs in flight x steps since then). Big groups run most often, in full launches, and a
        small group (a slow pair alone at its level) still runs in proportion, so it neither holds
        the others up nor is left for the end. Ties go to the finer level (closer to done)."""
        now = self.stats.steps
        best, key = None, None
        for hw, g in list(self._groups.items()):
            n = g.n_live + len(g.pending)
            if n == 0:  # every slot finished its warp and went elsewhere: free the batch
                del self._groups[hw]
                continue
            k = (n * (now - g.last_run + 1), hw[0] * hw[1])
            if key is None or k > key:
                best, key = g, k
        assert best is not None, "pairs in flight but in no group"
        return best

    def _needs_rebuild(self, g: _Group) -> bool:
        """Rebuild the device batch when a quarter of it would change, when no slot is live, or
        when pairs have waited one iteration block (inner_iterations steps of this group) to join."""
        n_live = g.n_live
        join = min(len(g.pending), self.batch_size - n_live)
        churn = len(g.slots) - n_live + join
        if not churn:
            return False
        return (n_live == 0 or 4 * churn >= max(len(g.slots), n_live + join)
                or g.since_rebuild >= self.params["inner_iterations"])

    def _rebuild(self, g: _Group) -> None:
        """New device batch for `g`: its live slots, then the oldest pending pairs that fit (entered and warped)."""
        p, lv, dev = self.params, g.lv, self.device
        keep = [i for i, live in enumerate(g.live) if live]
        g.pending.sort(key=lambda q: q.seq)
        room = self.batch_size - len(keep)
        join, g.pending = g.pending[:room], g.pending[room:]
        # level entry: the level's gradient stack, u from the coarser level, p back to zero
        entering: dict = {}
        for q in join:
            if q.entering:
                entering.setdefault(tuple(q.u.shape[-2:]), []).append(q)
        for src_hw, qs in entering.items():
            stack = gradient_stack(torch.stack([q.i1s[q.level] for q in qs]))
            u = torch.stack([q.u for q in qs])
            if src_hw != lv.hw:
                u = upsample_flow(u, lv.hw, p["scale_step"])
            for j, q in enumerate(qs):
                q.stack, q.u, q.entering = stack[j], u[j], False
                q.p = torch.zeros(2, 2, *lv.hw, device=dev, dtype=torch.float32)
                q.i1s[q.level] = None  # in the stack now
                if q.level + 1 < len(q.sizes):
                    q.i0s[q.level + 1] = q.i1s[q.level + 1] = None
        parts = []
        if keep:
            if len(keep) == len(g.slots):
                parts.append(g.tensors)
            else:
                idx = torch.tensor(keep, device=dev)
                parts.append(tuple(t.index_select(0, idx) for t in g.tensors))
        if join:
            u = torch.stack([q.u for q in join])
            stack, i0 = torch.stack([q.stack for q in join]), torch.stack([q.i0s[q.level] for q in join])
            wg, grad, rho = warp_terms(stack, i0, u, lv)
            parts.append((u, torch.stack([q.p for q in join]), wg, grad, rho))
            for q in join:
                q.u = q.p = None  # the batch holds them now
        g.slots = [g.slots[i] for i in keep] + join
        g.live = [True] * len(g.slots)
        g.tensors = tuple(torch.cat(ts) for ts in zip(*parts)) if len(parts) > 1 else (parts[0] if parts else None)
        g.live_mask = torch.ones(len(g.slots), dtype=torch.bool, device=dev)
        g.since_rebuild = 0
        if not g.slots and not g.pending:
            del self._groups[lv.hw]

    def _iterate(self, g: _Group) -> None:
        """One inner iteration of g's batch, then each pair's counters; finished warps leave the batch."""
        p, lv = self.params, g.lv
        wg, grad, rho = g.tensors[2:]
        # the median filter opens each of a pair's outer iterations
        need = [i for i, (q, live) in enumerate(zip(g.slots, g.live)) if live and q.inner == 0]
        try:
            u, pp, err = self._kernel_step(g, need)
        except Exception as e:  # a broken compiler toolchain must not stop flow extraction
            if not self._compile:
                raise
            warn_compile(e)
            self._compile, self._kernels = False, make_kernels(False)
            u, pp, err = self._kernel_step(g, need)
        g.tensors = (u, pp, wg, grad, rho)
        converged = (err <= lv.scaled_eps).tolist()  # the one host sync per iteration
        st = self.stats
        n_live = g.n_live
        st.steps += 1
        st.slot_iterations += len(g.slots)
        st.live_iterations += n_live
        g.since_rebuild += 1
        g.last_run = st.steps
        left = False
        for i, q in enumerate(g.slots):
            if not g.live[i]:
                continue
            if not converged[i]:
                q.inner += 1
                if q.inner == p["inner_iterations"]:
                    q.inner, q.outer = 0, q.outer + 1
                if q.outer < p["outer_iterations"]:
                    continue
            g.live[i] = False
            self._leave(q, g, i)
            left = True
        if left:
            g.live_mask = torch.tensor(g.live, dtype=torch.bool, device=self.device)

    def _kernel_step(self, g: _Group, need: list[int]):
        """Median filter of the slots in `need`, then the batched inner iteration (pure: no state changes)."""
        step, median = self._kernels
        lv, k = g.lv, self.params["median_filtering"]
        u, pp, wg, grad, rho = g.tensors
        if k > 1 and need:
            if len(need) == u.shape[0]:
                u = median(u, k)
            else:
                idx = torch.tensor(need, device=u.device)
                u = u.index_copy(0, idx, median(u.index_select(0, idx), k))
        return step(u, pp, wg, grad, rho, g.live_mask, lv.l_t, lv.theta, lv.taut, lv.err_cap, lv.err_scale)

    def _leave(self, q: _Pair, g: _Group, i: int) -> None:
        """Pair q finished a warp in slot i of g: next warp, next level, or done."""
        u, pp = g.tensors[0][i], g.tensors[1][i]
        q.warp += 1
        q.outer = q.inner = 0
        if q.warp < self.params["warps"]:
            q.u, q.p = u.clone(), pp.clone()
            g.pending.append(q)
        elif q.level > 0:
            q.u, q.warp, q.level, q.entering = u.clone(), 0, q.level - 1, True
            q.stack = q.p = None
            self._group(q.sizes[q.level]).pending.append(q)
        else:
            flow = u.clone()
            with self._lock:
                self._active.remove(q)
            self.stats.pairs += 1
            q.i0s = q.i1s = q.stack = None
            q.future.set_result(flow)


def tvl1_stream(pairs: Iterable, batch_size: int = 32, *, device: str | torch.device = "cpu",
                max_pairs: int | None = None, compile: bool | None = None,
                **params) -> Iterator[tuple[int, torch.Tensor]]:
    """Flow for an iterable of (prev, next) frame pairs, yielding (index, (2,H,W) flow) as pairs finish.

    Continuous batching (`ContinuousTVL1`): a pair that converges early is yielded early and its place
    goes to the next pair, so one slow pair holds up nobody. Pairs are read lazily, at most
    max_pairs + batch_size ahead of the ones yielded (enough to keep the device full).
    """
    solver = ContinuousTVL1(batch_size, device, max_pairs=max_pairs, compile=compile, **params)
    it = iter(enumerate(pairs))
    finished: collections.deque = collections.deque()
    exhausted, in_flight = False, 0
    while True:
        while not exhausted and in_flight < solver.max_pairs + batch_size:
            try:
                i, (a, b) = next(it)
            except StopIteration:
                exhausted = True
                break
            solver.submit(a, b).add_done_callback(lambda f, i=i: finished.append((i, f)))
            in_flight += 1
        if not in_flight:
            return
        solver.step()
        while finished:
            i, f = finished.popleft()
            in_flight -= 1
            yield i, f.result()



"""The store job: what every command that writes a store does around its per-video work
(`flowprep extract` with its backward-flow upgrade and --repair, `flowprep adopt`).

    before the lock   the command finds its videos and checks the job as a whole (JobError:
                      one sentence, nothing written); `run` creates --out (a file in the way,
                      no permission, a full disk: a sentence) and takes the store's lock
    under the lock    the command's check of the store's recorded parameters (`store_info`),
                      leftovers of killed writes removed, store.json and expected.json written,
                      each video planned (`plan`: whole in the store -> skipped; else a task)
    run               the tasks on a distributor (flowprep/distribute.py); each record appended
                      to the manifest as it comes; a full disk stops the job (every further
                      video would fail the same way)
    finish            the list files (flowprep/lists.py), store.json's listing, the summary

A command is a subclass naming its parts: `ExtractJob` (flowprep/extract.py), `AdoptJob`
(flowprep/adopt.py). Its per-video function is module-level (workers import it by name), returns
a manifest record (`record`) and never raises for a bad video. Nothing outside --out is written.
Exit status: 0 done, 1 some videos failed, 2 the job could not run (JobError).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from core.atomic import remove_temps
from core.ids import video_class
from core.layout import DONE, LISTING_KEYS, STORE_INFO
from core.progress import Progress
from core.splits import Labels, SplitsError, read_splits, sorted_labels
from flowprep import faults
from flowprep.distribute import Cluster, TaskLost, run_joblib, run_threads
from flowprep.distribute_ray import NodesLost, run_ray
from flowprep.lists import write_list_file, write_lists
from flowprep.lock import StoreLock, StoreLocked
from flowprep.store import Store
from flowprep.store_base import StoreError
from flowprep.store_files import (STOP_ERRNOS, add_expected, append_manifest, os_error_sentence, read_manifest,
                                  read_store_info, write_findings, write_store_info)

log = logging.getLogger("flowprep")

# The distributors by name: one function per engine, one signature (flowprep/distribute.py).
DISTRIBUTORS = {"ray": run_ray, "joblib": run_joblib, "threads": run_threads}
# Below this much free space on the store's disk the job does not start.
MIN_FREE_BYTES = 64 << 20


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the job; `summary` says what it had done (kept in the store)."""

    def __init__(self, summary: "Summary"):
        super().__init__()
        self.summary = summary

    def sentence(self) -> str:
        s = self.summary
        kept = sum(r.get("status") in DONE for r in read_manifest(s.out).values()) if s.out.is_dir() else 0
        return (f"stopped; {len(s.done) + len(s.upgraded)} videos were finished by this run and kept, {kept} in all "
                f"are whole in {s.out}: run the same command again to go on")


class JobError(Exception):
    """A problem with the job as a whole (no videos, the store in use, a full disk, a store made
    with other parameters, ...); the message says what to do. Nothing was written."""


def os_sentence(e: OSError, out: Path) -> str:
    if e.errno in STOP_ERRNOS:
        return (os_error_sentence(e, out) + "; free some space or choose another --out, then run the same command "
                "again (finished videos are kept)")
    return os_error_sentence(e, out)


def make_store_folder(out: Path) -> None:
    """Create --out, or say in a sentence why it cannot be: a file in the way, no permission, a full disk."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise JobError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise JobError(f"the disk holding {out} is full ({free / 2**20:.1f} MiB free, at least "
                       f"{MIN_FREE_BYTES >> 20} MiB needed to start); free some space or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create the store folder {out}: {os_sentence(e, out)}") from None


def record(video_id: str, source: str | Path, *, status: str | None = None, frames: int = 0, flows: int = 0,
           bflows: int = 0, size: list | None = None, seconds: float = 0.0, error: str | None = None,
           warning: str | None = None, errno: str | None = None, **extra) -> dict:
    """One line of OUT/manifest.jsonl: status "ok", "partial" (with `warning`) or "failed" (with
    `error`); errno: the error's name when a failure stops the job; `extra`: the command's own keys
    (declared/decoded frame counts of a decoded source, an adopted video's layout and naming)."""
    status = status or ("ok" if error is None else "failed")
    return {"id": video_id, "label": video_class(video_id), "source": str(source), "status": status,
            "frames": frames, "flows": flows, "bflows": bflows, "size": size, "seconds": round(seconds, 3),
            "error": error, "warning": warning, "errno": errno, **extra}


def run_task(work: Callable, args: tuple, injected: faults.Faults | None, *more):
    """What a worker runs: `work(*args, *more)` with the job's test faults installed (`more`: a
    distributor's extras, e.g. a GPU service actor)."""
    faults.install(injected)
    return work(*args, *more)


@dataclass
class Summary:
    out: Path
    total: int = 0
    done: list[str] = field(default_factory=list)      # done by this run (partial ones included)
    upgraded: list[str] = field(default_factory=list)  # whole forward videos that gained backward flows
    skipped: list[str] = field(default_factory=list)   # whole already
    failed: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)  # done, but the source was short
    notes: list[str] = field(default_factory=list)     # what the job decided for the user (capped workers, ...)
    pairs: int = 0
    frames: int = 0
    flows: int = 0
    seconds: float = 0.0
    workers: int = 0
    stopped: str | None = None  # why the job stopped before the end
    stop_code: int = 1          # its exit status: 1 a video's failure stopped it (a full disk), 2 the cluster
    not_run: int = 0            # videos left undone by a stop
    retried: int = 0            # videos whose task ran again after its worker or node died
    lost_nodes: list[dict] = field(default_factory=list)  # Ray nodes that died during the job
    logs: Path | None = None    # Ray's logs, kept because a worker died

    @property
    def exit_code(self) -> int:
        return self.stop_code if self.stopped else 1 if self.failed else 0

    def headline(self) -> str:
        raise NotImplementedError

    failed_label = "FAILED"

    def format(self) -> str:
        lines = [self.headline(), f"store: {self.out}"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.retried or self.lost_nodes:
            lines.append(f"  cluster: {self.retried} video(s) ran again after their worker or node died"
                         + "".join(f"; node {x['id'][:12]} at {x['ip']} lost ({x['reason']})" for x in self.lost_nodes))
        lines += [f"  PARTIAL {vid}: {why}" for vid, why in sorted(self.partial.items())]
        lines += [f"  {self.failed_label} {vid}: {reason}" for vid, reason in sorted(self.failed.items())]
        if self.logs:
            lines.append(f"Ray logs: {self.logs} (kept because a worker died)")
        if self.stopped:
            lines.append(self.stop_sentence())
        return "\n".join(lines)

    def stop_sentence(self) -> str:
        return (f"stopped early: {self.stopped}; {self.not_run} not started or interrupted. Fix that and "
                "run the same command again: finished videos are kept")


class StoreJob:
    """The skeleton (module docstring); subclasses give its parts."""

    summary_class: type[Summary] = Summary
    verb = "process"  # the start line: "M to <verb>"
    what = ""         # ... and what it makes, e.g. "tvl1 accurate, fused engine"

    def __init__(self, out: Path, videos: list[tuple[str, str]], *, command: str, backend: str = "threads",
                 workers: int = 1, cluster: Cluster | None = None, splits: Path | None = None,
                 progress: bool = True, notes: list[str] | None = None):
        self.out, self.videos, self.command = out, videos, command
        self.backend, self.workers, self.cluster = backend, workers, cluster or Cluster(store=out)
        self.splits, self.progress = splits, progress
        self.summary = self.summary_class(out=out, total=len(videos), notes=list(notes or []), workers=workers)
        self.old: dict = {}
        self.upgrades: set[str] = set()  # videos whose task only adds to what is stored
        self.findings: dict[str, str] = {}  # verify.json: videos found damaged, cleared as they are redone

    # ---------------------------------------------------------------- the command's parts
    def store_info(self, old: dict) -> dict:
        """store.json's parameters for this job, given the store's (`old`, {} for a new store);
        JobError when the store cannot be resumed with them."""
        raise NotImplementedError

    def clean(self) -> None:
        """Remove leftovers of killed writes (under the lock: no job is writing them)."""
        remove_temps(self.out)

    def prepare(self, store: Store) -> None:
        """Anything to do before the videos are planned (e.g. --repair's full check)."""

    def plan(self, store: Store, video_id: str, source: str) -> tuple | None:
        """(work, args) for a video to do, or None when it is whole in the store (skipped)."""
        raise NotImplementedError

    def stored_record(self, store: Store, video_id: str, source: str) -> dict:
        """The manifest record of a whole stored video (when the manifest lost it)."""
        with store.open(video_id) as v:
            m = v.meta
            return record(video_id, source, status="partial" if m.get("partial") else "ok", frames=v.num_frames,
                          flows=v.num_flows, bflows=v.num_bflows, size=m.get("size"), warning=m.get("warning"),
                          **self.record_extra(m))

    def record_extra(self, meta: dict) -> dict:
        """The command's own manifest keys, from a stored video's meta."""
        return {}

    def failed(self, video_id: str, source: str, reason: str) -> dict:
        """The record of a video whose task returned none (its worker died on every attempt)."""
        return record(video_id, source, error=reason, **self.record_extra({}))

    def before_run(self) -> None:
        """Anything to do once the videos are planned, before any runs (e.g. compiling kernels once)."""

    def for_submission(self, task: tuple, remaining: int, in_flight: int) -> tuple:
        """The (work, args) of a task as it is handed to a worker, knowing how many tasks are left
        (this one included) and running (e.g. more threads for the last videos of a job)."""
        return task

    def account(self, rec: dict, upgrade: bool) -> None:
        """Count a finished record in the summary's amounts."""

    def status(self, seconds: float) -> str:
        """The progress line's status text."""
        return ""

    def has_rgb(self, store: Store, records) -> bool:
        return True

    # ---------------------------------------------------------------- the skeleton
    def run(self) -> Summary:
        t0 = time.perf_counter()
        make_store_folder(self.out)
        lock = StoreLock(self.out, self.command)
        try:
            lock.acquire()
        except StoreLocked as e:
            raise JobError(str(e)) from None
        except OSError as e:
            raise JobError(f"cannot lock the store {self.out}: {os_sentence(e, self.out)}") from None
        try:
            self._locked(lock)
        except OSError as e:  # the driver's own writes (manifest, lists) on a full or failing disk
            raise JobError(os_sentence(e, self.out)) from None
        except KeyboardInterrupt:
            raise Interrupted(self.summary) from None
        finally:
            lock.release()
        self.summary.seconds = time.perf_counter() - t0
        if self.progress:
            click.echo(self.summary.format(), err=True)
        return self.summary

    def _read_old(self) -> dict:
        try:
            return read_store_info(self.out)
        except StoreError:
            if (self.out / STORE_INFO).is_file():
                return {"damaged": True}
            return {}

    def _locked(self, lock: StoreLock) -> None:
        s, out = self.summary, self.out
        if lock.note:
            s.notes.insert(0, lock.note + "; its unfinished videos are redone")
        self.old = self._read_old()
        info = self.store_info(self.old)
        self.clean()
        write_store_info(out, {**{k: self.old[k] for k in LISTING_KEYS if k in self.old}, **info})
        add_expected(out, self.videos)

        store = Store(out)
        self.findings = dict(store.findings)
        manifest = read_manifest(out)
        self.prepare(store)
        todo, sources = [], dict(self.videos)
        for vid, source in self.videos:
            task = self.plan(store, vid, source)
            if task is None:
                s.skipped.append(vid)
                if manifest.get(vid, {}).get("status") not in DONE:  # manifest lost or stale: rebuild the record
                    append_manifest(out, self.stored_record(store, vid, source))
            else:
                todo.append((vid, task))
        if self.progress:
            adding = f" ({len(self.upgrades)} of them only to add backward flows)" if self.upgrades else ""
            where = f" on {self.cluster.address}" if self.cluster.address else ""
            what = f" ({self.what})" if self.what else ""
            log.info(f"flowprep: {len(self.videos)} videos, {len(s.skipped)} already done, {len(todo)} to {self.verb}"
                     f"{what}{adding} with {self.backend} ({self.workers or 'all'} workers{where}) into {out}")
            for note in s.notes:
                log.info(f"note: {note}")

        if todo:
            self.before_run()
        injected = faults.from_env()
        counts = {"submitted": 0, "processed": 0}

        def tasks():
            for i, (vid, task) in enumerate(todo):
                work, args = self.for_submission(task, len(todo) - i, counts["submitted"] - counts["processed"])
                counts["submitted"] += 1
                yield vid, (work, args, injected)
        results = DISTRIBUTORS[self.backend](run_task, tasks(), self.workers, self.cluster) if todo else iter(())
        t_run, processed = time.perf_counter(), 0
        try:
            with Progress(len(todo), f"{self.verb}ing", unit="videos", show=self.progress) as bar:
                for vid, result in results:
                    processed = counts["processed"] = processed + 1
                    rec = self.failed(vid, sources[vid], result.reason) if isinstance(result, TaskLost) else result
                    append_manifest(out, rec)
                    self._count(rec)
                    bar.update(1, status=self.status(time.perf_counter() - t_run),
                               failed=int(rec["status"] not in DONE))
                    if rec.get("errno"):
                        s.stopped = rec["error"]
                        s.not_run = len(todo) - processed
                        break
        except NodesLost as e:  # as after Ctrl-C: what finished is kept
            s.stopped, s.stop_code, s.not_run = str(e), 2, len(todo) - processed
        finally:
            close = getattr(results, "close", None)
            if close:
                close()  # stops the workers of a stopped job; shuts down a local Ray cluster
        s.logs = self.cluster.logs
        s.retried, s.lost_nodes = self.cluster.stats.retried_tasks, list(self.cluster.stats.lost_nodes)
        self.clean()  # partial copies of videos whose worker was killed and retried
        self.finish(store)
        append_manifest(out, self._job_record(len(todo), processed))

    def _job_record(self, todo: int, processed: int) -> dict:
        """The manifest's line for the job as a whole (id null: no video's), after its videos' lines."""
        s = self.summary
        return {"id": None, "job": self.verb, "videos": s.total, "to_do": todo, "done": len(s.done) + len(s.upgraded),
                "skipped": len(s.skipped), "failed": len(s.failed), "not_run": s.not_run, "stopped": s.stopped,
                "backend": self.backend, "workers": self.workers, "retried_tasks": s.retried,
                "lost_nodes": s.lost_nodes}

    def _count(self, rec: dict) -> None:
        s, vid = self.summary, rec["id"]
        upgrade = vid in self.upgrades
        if rec["status"] in DONE:
            (s.upgraded if upgrade else s.done).append(vid)
            self.findings.pop(vid, None)   # redone: what verify found is gone
            if rec["status"] == "partial" and not upgrade:
                s.partial[vid] = rec["warning"]
        else:
            s.failed[vid] = rec["error"]
        self.account(rec, upgrade)

    def labels(self, records) -> Labels:
        """The class index of the list files: --splits, else the one recorded in the store, else sorted names."""
        if self.splits is not None:
            return read_splits(self.splits)  # checked before the job started
        if self.old.get("splits"):
            try:
                return read_splits(self.old["splits"])
            except SplitsError as e:
                self.summary.notes.append(f"the split folder this store was listed with cannot be read ({e}); labels "
                                          "are the sorted class names now (pass --splits to keep the official ones)")
        return sorted_labels(r["id"] for r in records if r.get("status") in DONE)

    def finish(self, store: Store) -> None:
        """verify.json (less the videos redone), the list files and store.json's listing (labels,
        classes, MMAction2 settings)."""
        write_findings(self.out, self.findings)
        records = read_manifest(self.out).values()
        labels = self.labels(records)
        write_list_file(self.out, records, labels.index)
        rgb = self.has_rgb(store, records)
        info = store.info   # as _locked wrote it; nothing writes store.json until here
        lists, notes = write_lists(self.out, records, labels, rgb=rgb, previous=info.get("lists") or ())
        self.summary.notes += notes
        listing = {"labels_from": labels.source, "classes": labels.classes, "lists": lists}
        if labels.folder:
            listing["splits"] = labels.folder
        if store.mmaction2:
            listing["mmaction2"] = store.mmaction2
        write_store_info(self.out, {**{k: v for k, v in info.items() if k not in LISTING_KEYS}, "rgb": rgb,
                                    **listing})

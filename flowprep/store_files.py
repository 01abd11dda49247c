"""The store's own files, whatever its format (names in core/layout.py)::

    OUT/store.json          parameters (a resumed job must match them), labels and MMAction2 settings
    OUT/manifest.jsonl      one record per attempt, the last one wins: status ok / partial / failed
    OUT/expected.json       every video any job on this store was asked for (id -> source), so
                            `flowprep verify` knows what a finished store holds
    OUT/verify.json         the last verify's findings, redone by the next `flowprep extract`

List files (videos.txt, lists/) are flowprep/lists.py's. Every file is written atomically
(core/atomic.py), the manifest by appending whole lines.
"""
from __future__ import annotations

import errno as errnos
import json
from pathlib import Path
from typing import Iterable

from core.atomic import write_json
from core.layout import EXPECTED, FINDINGS, FORMATS, MANIFEST, STORE_INFO
from flowprep.store_base import StoreError

# A video failing with one of these (writing the store) stops the job: the next would fail too.
STOP_ERRNOS = {errnos.ENOSPC: "the disk is full", errnos.EDQUOT: "the disk quota is exceeded",
               errnos.EROFS: "the store's file system is read-only"}


def os_error_sentence(e: OSError, store: str | Path) -> str:
    """An OSError as a sentence: the error, its file, and for a STOP_ERRNOS error what it means
    for the store."""
    where = f" ({e.filename})" if e.filename else ""
    stop = f": {STOP_ERRNOS[e.errno]} where the store {store} is" if e.errno in STOP_ERRNOS else ""
    return f"{e.strerror or e}{where}{stop}"


def read_store_info(root: str | Path) -> dict:
    path = Path(root) / STORE_INFO
    if not path.is_file():
        raise StoreError(f"{root} is not a flowprep store (no {STORE_INFO}); run `flowprep extract` to make one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is damaged (not JSON: {e}); `flowprep extract --overwrite` with the store's "
                         "options rewrites it (and redoes every video)") from None


def write_store_info(root: str | Path, info: dict) -> None:
    if info.get("format") not in FORMATS:
        raise ValueError(f"store format must be one of {FORMATS}, got {info.get('format')!r}")
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json(Path(root) / STORE_INFO, info)


def store_direction(info: dict) -> str:
    """direction of a store (store.json, or a video's meta); "forward" for stores from before it was recorded."""
    return info.get("direction") or "forward"


def append_manifest(root: str | Path, record: dict) -> None:
    """Append one record; a single line written in one call, so readers never see half a record."""
    with open(Path(root) / MANIFEST, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_manifest(root: str | Path) -> dict[str, dict]:
    """Latest manifest record per video id (a resumed job appends newer records); the jobs' own
    lines (id null: what a job did as a whole) are left out."""
    path = Path(root) / MANIFEST
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: the video is re-checked anyway
                if isinstance(rec, dict) and rec.get("id") is not None:
                    records[rec["id"]] = rec
    return records


def read_json(path: Path, default):
    """A store-level JSON file, or `default` when it is absent (or cut by a crash: it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def read_expected(root: str | Path) -> dict[str, str]:
    """Every video any job on the store was asked for: id -> source path."""
    return read_json(Path(root) / EXPECTED, {}).get("videos", {})


def add_expected(root: str | Path, videos: Iterable[tuple[str, str | Path]]) -> None:
    """Add a job's videos to OUT/expected.json (a union: a later job with a shorter list keeps the others)."""
    known = read_expected(root)
    new = {**known, **{vid: str(src) for vid, src in videos}}
    if new != known or not (Path(root) / EXPECTED).is_file():
        write_json(Path(root) / EXPECTED, {"videos": dict(sorted(new.items()))})


def read_findings(root: str | Path) -> dict[str, str]:
    """Videos the last `flowprep verify` (or --repair) found damaged: id -> what it found."""
    return read_json(Path(root) / FINDINGS, {}).get("problems", {})


def write_findings(root: str | Path, problems: dict[str, str]) -> None:
    """Record verify's findings for the next extract to redo; no file when there are none."""
    path = Path(root) / FINDINGS
    if problems:
        write_json(path, {"problems": dict(sorted(problems.items()))})
    else:
        path.unlink(missing_ok=True)

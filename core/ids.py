"""Video ids: the one name a video has in a store, a manifest, a list file and a split file.

An id is the video's path inside the videos folder without its extension, '/'-separated
(`ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01`); its first folder is its class. The id names the
video's place in a store, so it must be a clean relative path (`id_problem`).
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

# Whitespace and control characters: what a list file line cannot hold in a name.
_UNLISTABLE = re.compile(r"[\s\x00-\x1f\x7f]+")


def id_problem(video_id: str) -> str | None:
    """Why `video_id` cannot name a video in a store, or None when it can.

    An id is a path inside the store, so it must be relative, '/'-separated, without '.' or '..'
    parts (nothing may be written or removed outside the store), without parts starting with '.'
    (the store's own names), and free of whitespace and control characters (list files separate
    columns by whitespace, one video a line) and of bytes that are not UTF-8.
    """
    if not video_id:
        return "an empty name"
    try:
        video_id.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not valid UTF-8"
    if video_id.startswith("/"):
        return "an absolute path (ids are paths relative to --videos)"
    parts = video_id.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with '..', '.' or empty parts (ids are clean paths relative to --videos)"
    if any(p.startswith(".") for p in parts):
        return "a hidden name (starting with '.'), reserved for the store's own files"
    if any(c.isspace() for c in video_id):
        return "whitespace in the name, which list files (videos.txt, MMAction2 lists) cannot hold"
    if any(unicodedata.category(c) == "Cc" for c in video_id):
        return "a control character in the name"
    return None


def id_from_path(rel: str) -> str:
    """A video's id from its path inside the videos folder: the path without its extension,
    '/'-separated, each run of whitespace or control characters made one '_' (list files separate
    columns by whitespace), so users' own names keep working: `holiday/IMG 0001.MOV` ->
    `holiday/IMG_0001`. Two paths that give one id are refused where videos are found, naming both;
    the manifest and expected.json map every id to its source path."""
    return _UNLISTABLE.sub("_", PurePosixPath(rel).with_suffix("").as_posix())


def video_class(video_id: str) -> str:
    """Class of a video id: its first folder, or "" for a video at the top of a flat folder."""
    return video_id.split("/", 1)[0] if "/" in video_id else ""

"""Hostile inputs: list lines that leave --videos, symlink loops, nested ids, odd names, truncated and
unreadable files, an OpenCV without the contrib modules. Each is refused up front or reported, and
nothing outside --out is ever written or removed."""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from twostream.flowprep_cli import main
from flowprep.job import JobError as ExtractError
from flowprep.extract_options import ExtractOptions
from flowprep.extract import extract_video
from flowprep.extract_job import run_extract
from flowprep.store import Store
from flowprep.store_files import read_expected, read_manifest, write_store_info
from flowprep.verify import verify_store
from flowprep.video import find_videos
from videos import run_flowprep as run
from videos import write_cut_video, write_moving_video

OPTS = ExtractOptions(size=(64, 48), preset="fast")
JOB = dict(backend="joblib", workers=1, progress=False)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. --list lines that leave --videos

@pytest.fixture
def escape_setup(tmp_path):
    videos = tmp_path / "videos"
    write_moving_video(videos / "a" / "good.avi", n=4)
    victim = tmp_path / "victimdir"  # out/../victimdir
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    write_moving_video(tmp_path / "outside" / "name.avi", n=4)
    existing = tmp_path / "outside" / "name"  # what a writer for id ../outside/name would replace
    existing.mkdir()
    (existing / "precious.txt").write_text("keep me too")
    out = tmp_path / "out"
    out.mkdir()
    return videos, out, tmp_path


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("line", ["../victimdir", "../outside/name.avi", "a/../../outside/name.avi", "ABSOLUTE"])
def test_list_lines_outside_videos_are_refused_before_anything_runs(escape_setup, line, overwrite):
    videos, out, tmp = escape_setup
    if line == "ABSOLUTE":
        line = str(tmp / "outside" / "name.avi")
    lst = tmp / "list.txt"
    lst.write_text(f"a/good.avi\n{line}\n")
    before = tree(tmp / "victimdir"), tree(tmp / "outside")
    with pytest.raises(ExtractError) as e:
        run_extract(videos, out, OPTS, list_file=lst, overwrite=overwrite, **JOB)
    msg = str(e.value)
    assert f"{lst}:2" in msg and line in msg and "relative" in msg, msg
    assert (tree(tmp / "victimdir"), tree(tmp / "outside")) == before
    assert not (out / "a").exists()  # refused up front: not even the good line ran


def test_cli_refuses_escaping_list_with_exit_2(escape_setup):
    videos, out, tmp = escape_setup
    lst = tmp / "list.txt"
    lst.write_text("../victimdir\n")
    r = CliRunner().invoke(main, ["extract", "--videos", str(videos), "--out", str(out), "--list", str(lst),
                                  "--backend", "joblib", "--overwrite"])
    assert r.exit_code == 2 and "../victimdir" in r.output, r.output
    assert (tmp / "victimdir" / "precious.txt").read_text() == "keep me"


def test_links_inside_videos_may_point_anywhere_for_reading(escape_setup):
    videos, out, tmp = escape_setup
    (videos / "linked").symlink_to(tmp / "outside")
    lst = tmp / "list.txt"
    lst.write_text("linked/name.avi\n")
    summary = run_extract(videos, out, OPTS, list_file=lst, **JOB)
    assert summary.done == ["linked/name"] and Store(out).check("linked/name") is None
    assert (tmp / "outside" / "name" / "precious.txt").is_file()


# ---------------------------------------------------------------- 2. symlink loops

def test_symlink_loop_and_duplicates_extract_each_video_once(tmp_path):
    videos = tmp_path / "videos"
    write_moving_video(videos / "A" / "v.avi", n=4)
    write_moving_video(videos / "B" / "w.avi", n=4, seed=1)
    (videos / "A" / "self").symlink_to(".")  # a loop
    (videos / "C").mkdir()
    (videos / "C" / "alias").symlink_to("../A")  # the same folder under another name
    (videos / "D").mkdir()
    (videos / "D" / "again.avi").symlink_to("../A/v.avi")  # the same file under another name
    summary = run_extract(videos, tmp_path / "out", OPTS, **JOB)
    assert sorted(summary.done) == ["A/v", "B/w"] and summary.total == 2
    text = summary.format()
    for dup in ("A/self", "C/alias", "D/again"):
        assert text.count(dup) == 1, text  # each reported once
    assert "A/v" in text


def test_two_symlink_loops_do_not_hang(tmp_path):
    videos = tmp_path / "videos"
    write_moving_video(videos / "A" / "v.avi", n=3)
    write_moving_video(videos / "B" / "w.avi", n=3)
    (videos / "A" / "toB").symlink_to("../B")
    (videos / "B" / "toA").symlink_to("../A")
    (videos / "A" / "self").symlink_to(".")
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from flowprep.video import find_videos
        print(sorted(v for v, _ in find_videos({str(videos)!r})))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['A/v', 'B/w']"


# ---------------------------------------------------------------- 3. nested ids

@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_nested_ids_are_refused_naming_both(tmp_path, fmt):
    videos = tmp_path / "videos"
    write_moving_video(videos / "A" / "v.avi", n=4)
    write_moving_video(videos / "A" / "v" / "w.avi", n=4, seed=1)
    out = tmp_path / "out"
    with pytest.raises(ExtractError) as e:
        run_extract(videos, out, ExtractOptions(**{**OPTS.__dict__, "format": fmt}), **JOB)
    msg = str(e.value)
    assert "A/v.avi" in msg and "A/v/w.avi" in msg and "rename" in msg, msg
    assert not (out / "A").exists()


# ---------------------------------------------------------------- 8. names videos.txt cannot hold

def test_names_with_spaces_and_accents_are_kept_under_ids_without_whitespace(tmp_path):
    """Users' own videos: spaces, tabs, newlines and accents in file and folder names. Each gets an
    id without whitespace (a run of it becomes '_'), every list line still has three fields, and
    the manifest and expected.json map each id to its source."""
    videos = tmp_path / "videos"
    names = {"a/fine.avi": "a/fine", "a/with space.avi": "a/with_space", "a/new\nline.avi": "a/new_line",
             "tab\tclass/x.avi": "tab_class/x", "Été ü/clip ü é  01.avi": "Été_ü/clip_ü_é_01",
             "holiday/IMG 0001.avi": "holiday/IMG_0001"}
    for k, name in enumerate(names):
        write_moving_video(videos / name, n=4, seed=k)
    (videos / "a" / "anim.gif").write_bytes(b"GIF89a")
    out = tmp_path / "out"
    r = run("extract", "--videos", videos, "--out", out, "--backend", "joblib", "--workers", "1", "--size", "64x48",
            "--preset", "fast")
    assert r.exit_code == 0, r.output
    assert f"{len(names)} videos: {len(names)} extracted" in r.output
    assert "1 files skipped for their extension (.gif 1)" in r.output and "ffmpeg" in r.output  # not silently
    manifest = read_manifest(out)
    assert sorted(manifest) == sorted(names.values())
    for source, vid in names.items():
        assert manifest[vid]["status"] == "ok" and manifest[vid]["source"] == str(videos / source)
        assert read_expected(out)[vid] == str(videos / source)
    for lst in ["videos.txt", "rgb.txt", "flow.txt"]:
        lines = (out / lst).read_text().splitlines()
        assert len(lines) == len(names) and all(len(line.split()) == 3 for line in lines), lines
    assert verify_store(out).problems == {}


def test_names_that_would_share_an_id_are_refused_naming_both(tmp_path):
    videos = tmp_path / "videos"
    write_moving_video(videos / "a" / "with space.avi", n=4)
    write_moving_video(videos / "a" / "with_space.avi", n=4)
    with pytest.raises(ExtractError) as e:
        run_extract(videos, tmp_path / "out", OPTS, **JOB)
    msg = str(e.value)
    assert "a/with space.avi and a/with_space.avi would both get the id 'a/with_space'" in msg, msg
    assert not (tmp_path / "out" / "a").exists()


# ---------------------------------------------------------------- 6. truncated source files

def test_cut_source_is_partial_and_keeps_no_bad_frame(tmp_path):
    full = write_cut_video(tmp_path / "full.avi", keep=1.0)
    cut = write_cut_video(tmp_path / "cut.avi", keep=0.91)
    rec_full = extract_video(full, tmp_path / "store", "full", OPTS)
    rec = extract_video(cut, tmp_path / "store", "cut", OPTS)
    assert rec_full["status"] == "ok" and rec_full["frames"] == 40
    assert rec["status"] == "partial", rec
    assert (rec["declared_frames"], rec["decoded_frames"], rec["frames"], rec["flows"]) == (40, 37, 36, 35)
    assert "37 of the 40" in rec["warning"] and "dropped" in rec["warning"]
    write_store_info(tmp_path / "store", OPTS.store_info())  # extract_video alone writes only the videos
    store = Store(tmp_path / "store")
    with store.open("cut") as v, store.open("full") as f:
        assert (v.meta["declared_frames"], v.meta["decoded_frames"], v.meta["partial"]) == (40, 37, True)
        assert all(v.rgb_bytes(i) == f.rgb_bytes(i) for i in range(v.num_frames))  # every kept frame is sound
        assert all(v.flow_bytes(i) == f.flow_bytes(i) for i in range(v.num_flows))


def test_partial_video_in_summary_and_manifest(tmp_path):
    write_cut_video(tmp_path / "v" / "c" / "cut.avi", keep=0.91)
    write_moving_video(tmp_path / "v" / "c" / "good.avi", n=4)
    summary = run_extract(tmp_path / "v", tmp_path / "out", OPTS, **JOB)
    assert summary.exit_code == 0 and sorted(summary.done) == ["c/cut", "c/good"]
    assert "PARTIAL c/cut: decoding stopped after 37 of the 40" in summary.format()
    rec = read_manifest(tmp_path / "out")["c/cut"]
    assert rec["status"] == "partial" and rec["decoded_frames"] == 37 and rec["frames"] == 36
    assert (tmp_path / "out" / "videos.txt").read_text() == "c/cut 36 0\nc/good 4 0\n"


# ---------------------------------------------------------------- 9. unreadable source

@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_source_says_permission_denied(tmp_path):
    src = write_moving_video(tmp_path / "locked.avi", n=4)
    src.chmod(0)
    rec = extract_video(src, tmp_path / "store", "locked", OPTS)
    assert rec["status"] == "failed" and "permission denied" in rec["error"], rec


def test_unreadable_source_says_permission_denied_simulated(tmp_path, monkeypatch):
    """The same as root: opening the file for reading raises EACCES, as it does for other users."""
    import builtins

    import flowprep.video

    src = write_moving_video(tmp_path / "locked.avi", n=4)
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if Path(path) == src:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(flowprep.video, "open", fake_open, raising=False)
    rec = extract_video(src, tmp_path / "store", "locked", OPTS)
    assert rec["status"] == "failed" and "permission denied" in rec["error"] and "chmod" in rec["error"], rec


# ---------------------------------------------------------------- 10. OpenCV without the contrib modules

def test_missing_cv2_optflow_stops_before_starting(tmp_path, monkeypatch):
    write_moving_video(tmp_path / "v" / "a.avi", n=3)
    monkeypatch.delattr(cv2, "optflow")
    with pytest.raises(ExtractError) as e:
        run_extract(tmp_path / "v", tmp_path / "out", OPTS, **JOB)
    assert "pip uninstall opencv-python opencv-python-headless && pip install opencv-contrib-python-headless" \
        in str(e.value)
    assert not (tmp_path / "out").exists()
    # Farneback is in the main module: it still runs.
    summary = run_extract(tmp_path / "v", tmp_path / "out", ExtractOptions(size=(64, 48), algo="farneback"), **JOB)
    assert summary.done == ["a"]


def test_find_videos_ids_stay_clean(tmp_path):
    write_moving_video(tmp_path / "x" / "v.AVI", n=3)
    assert find_videos(tmp_path) == [("x/v", tmp_path / "x" / "v.AVI")]


# ---------------------------------------------------------------- long names, changed sources

@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_a_long_but_legal_name_extracts(tmp_path, fmt):
    """A 244-byte file name is legal (255 is the limit); the temporary names of its writes must not push past it."""
    name = "x" * 240
    write_moving_video(tmp_path / "videos" / "a" / f"{name}.avi", n=4)
    summary = run_extract(tmp_path / "videos", tmp_path / "out", OPTS.replace(format=fmt), **JOB)
    assert summary.exit_code == 0 and summary.done == [f"a/{name}"], summary.format()
    assert Store(tmp_path / "out").check(f"a/{name}") is None


def test_a_replaced_or_grown_source_is_redone_on_resume_a_touched_one_is_not(tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "out"
    for i in range(3):
        write_moving_video(videos / "c" / f"v{i}.avi", n=5, seed=i)
    first = run_extract(videos, out, OPTS, **JOB)
    assert len(first.done) == 3
    write_moving_video(videos / "c" / "v0.avi", n=7, seed=9)  # replaced: other content, other size
    st = (videos / "c" / "v1.avi").stat()
    os.utime(videos / "c" / "v1.avi", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched (a copy): same bytes
    again = run_extract(videos, out, OPTS, **JOB)
    assert again.done == ["c/v0"] and sorted(again.skipped) == ["c/v1", "c/v2"], again.format()
    assert "1 stored video(s) redone: their source changed" in again.format() and "c/v0" in again.format()
    with Store(out).open("c/v0") as v:
        assert v.num_frames == 7

"""One writer per output folder, and faults that say what is safe.

Locks: a second writer is refused at once in one line naming the holder; a dead holder's lock is
taken over with a message (same host: its pid is gone or another process's; anywhere: no heartbeat
for STALE_S), and of two contenders for one stale lock only one wins;
waiting works; only the owner releases. Each writing command (train, knn, demo; extract in
tests/extract/test_extract.py) refuses a folder another process holds, and two trainings started
together into one folder leave exactly one run's log and checkpoint. Faults: a full disk during
a checkpoint, a read-only output folder and a feature file truncated between two steps each give
exit 2, one line saying what is intact, and no temporary file left behind."""
import errno
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core import lock as lock_mod
from omh_ref.core.errors import InputError
from omh_ref.core.lock import LOCK_NAME, FolderLock
from omh_ref.train import checkpoint
from omh_ref_cli.main import main

from .builders import write_feats
from .helpers import lock_holder


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if ".tmp-" in p or p.startswith(LOCK_NAME))


def test_a_second_writer_is_refused_then_a_dead_holders_lock_is_taken_over(tmp_path):
    p = lock_holder(tmp_path)
    try:
        with pytest.raises(InputError, match=rf"{tmp_path}: another omh-ref train \(pid {p.pid} on "
                                             rf"{socket.gethostname()}, started .*\) is writing here"):
            FolderLock(tmp_path, "extract").acquire()
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / LOCK_NAME).exists()          # SIGKILL: no release ran
    said = []
    with FolderLock(tmp_path, "extract", say=said.append):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "extract"
    assert len(said) == 1 and f"pid {p.pid}" in said[0] and "no longer running" in said[0]
    assert _leftovers(tmp_path) == []


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "train",
                                                  "started": time.time(), "token": "x"}))
    with pytest.raises(InputError, match=r"another omh-ref train \(pid 1 on elsewhere"):
        FolderLock(tmp_path, "train").acquire()
    old = time.time() - lock_mod.STALE_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))
    said = []
    with FolderLock(tmp_path, "train", say=said.append):
        pass
    assert "taking over the lock of omh-ref train (pid 1 on elsewhere" in said[0]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_contenders_for_one_stale_lock_cannot_both_win(tmp_path, monkeypatch):
    """B judges a dead holder's lock stale; before B renames it aside, A takes it over and holds
    the folder. B's rename then moves A's live lock: B must see that, put it back and be refused
    (it deleted A's lock and took the folder too, so both held it)."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                  "command": "train", "started": time.time(), "token": "dead"}))
    rival = []

    def a_takes_it_first():
        if not rival:
            rival.append(lock_holder(tmp_path, "extract"))       # takes over the dead lock, holds it

    monkeypatch.setattr(lock_mod, "_before_take_over", a_takes_it_first)
    try:
        with pytest.raises(InputError, match=r"another omh-ref extract \(pid \d+ "):
            FolderLock(tmp_path, "train").acquire()
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == rival[0].pid and info["command"] == "extract"   # A's lock, back in place
        assert _leftovers(tmp_path) == [LOCK_NAME]
    finally:
        for p in rival:
            p.kill()
            p.wait()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    """Same host, the pid alive but another process now (its start time differs), or a lock
    without a start time whose heartbeat stopped: taken over (it blocked the folder for ever)."""
    me = os.getppid()                                   # a live process that is not the holder
    start = lock_mod._pid_start(me)
    if start is None:
        pytest.skip("no /proc here")
    lock = {"pid": me, "host": socket.gethostname(), "command": "train", "started": time.time(), "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**lock, "pid_start": start}))
    with pytest.raises(InputError, match=rf"another omh-ref train \(pid {me} "):   # the same process: live
        FolderLock(tmp_path, "knn").acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**lock, "pid_start": start + 1}))
    said = []
    with FolderLock(tmp_path, "knn", say=said.append):
        pass
    assert "taking over the lock of omh-ref train" in said[0]
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))  # no start time recorded: judged by its heartbeat
    with pytest.raises(InputError, match="is writing here"):
        FolderLock(tmp_path, "knn").acquire()
    old = time.time() - lock_mod.STALE_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))
    said = []
    with FolderLock(tmp_path, "knn", say=said.append):
        pass
    assert "taking over" in said[0] and _leftovers(tmp_path) == []


def test_the_heartbeat_touches_only_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    with FolderLock(tmp_path, "train") as lk:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "token": "someone else"}))
        old = time.time() - 100
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert not lk.owned() and abs((tmp_path / LOCK_NAME).stat().st_mtime - old) < 1


def test_the_heartbeat_keeps_a_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    with FolderLock(tmp_path, "train"):
        old = time.time() - 100
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5


def test_waiting_for_thelock_holder(tmp_path):
    p = lock_holder(tmp_path, "knn", seconds=1.0)
    said = []
    t0 = time.time()
    with FolderLock(tmp_path, "train", wait=True, say=said.append):
        assert time.time() - t0 > 0.3
    p.wait()
    assert "waiting for omh-ref knn" in said[0]


def test_only_the_owner_releases(tmp_path):
    lk = FolderLock(tmp_path, "train").acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "token": "someone else"}))
    lk.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_on_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with FolderLock(tmp_path, "train"):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------ the commands

def _feats(path, n=16, seed=0):
    return write_feats(path, n, 4, 5, 7, np.float32, seed)


def _train_args(feats, out, *extra):
    return ["train", "--features", feats, "--out", str(out), "--quiet", "--steps", "6", "--batch-size", "4",
            "--levels", "6,3", "--dim", "5", "--feature-samples", "3", "--neg-samples", "2", "--log-every", "2",
            "--ckpt-every", "2", *extra]


@pytest.mark.parametrize("command", ["train", "knn", "demo"])
def test_each_command_refuses_a_folder_another_process_writes(tmp_path, command):
    feats = _feats(tmp_path / "data" / "feats.npy")
    folder = {"train": tmp_path / "run", "knn": tmp_path / "data", "demo": tmp_path / "demo"}[command]
    folder.mkdir(exist_ok=True)
    args = {"train": _train_args(feats, folder), "knn": ["knn", "--features", feats],
            "demo": ["demo", "--out", str(folder), "--steps", "1", "--n-train", "8", "--n-val", "4",
                     "--seeds", "0", "--quiet"]}[command]
    before = sorted(os.listdir(folder))
    p = lock_holder(folder, "extract")
    try:
        res = CliRunner().invoke(main, args)
    finally:
        p.kill()
        p.wait()
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"error: {folder}: another omh-ref extract (pid {p.pid}")
    # nothing written into the held folder (the killed holder's lock file stays, as after a crash)
    assert sorted(set(os.listdir(folder)) - {LOCK_NAME}) == before


def test_two_trainings_started_together_into_one_folder(tmp_path):
    """Exactly one runs; the other is refused in one line; the survivor's log and checkpoint are
    its own (before locks, both exited 0 with their log lines interleaved)."""
    feats = _feats(tmp_path / "feats.npy", n=24)
    assert CliRunner().invoke(main, ["knn", "--features", feats]).exit_code == 0
    out = tmp_path / "run"
    # long enough (~3 s of steps) that the two overlap whatever their start-up jitter
    longer = ("--steps", "1500", "--log-every", "500", "--ckpt-every", "500")
    procs = [subprocess.Popen([sys.executable, "-m", "omh_ref_cli.main",
                               *_train_args(feats, out, "--seed", str(s), *longer)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    res = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in res)
    assert codes == [0, 2], res
    loser = next(r for r in res if r[0] == 2)
    lines = [ln for ln in loser[2].splitlines() if ln.strip()]
    assert len(lines) == 1 and "another omh-ref train (pid" in lines[0] and "Traceback" not in loser[2]
    winner_seed = 1 + [r[0] for r in res].index(0)
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [500, 1000, 1500]
    assert checkpoint.load(out / "ckpt.npz")["info"]["options"]["seed"] == winner_seed
    assert _leftovers(out) == []


# ------------------------------------------------------------------ faults

def test_a_full_disk_during_a_checkpoint_says_what_is_intact(tmp_path, monkeypatch):
    from omh_ref.core import files

    feats = _feats(tmp_path / "feats.npy")
    out = tmp_path / "run"
    real, calls = files._fsync_file, []

    def full(path):
        if ".ckpt.npz.tmp-" in str(path):
            calls.append(path)
            if len(calls) == 2:                     # the step-2 checkpoint lands, the step-4 one fails
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(files, "_fsync_file", full)
    res = CliRunner().invoke(main, _train_args(feats, out))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: {out / 'ckpt.npz'}: cannot write the step-4 checkpoint (No space left on device); the step-2 "
        f"checkpoint {out / 'ckpt.npz'} is intact; continue with --resume {out / 'ckpt.npz'}")
    assert checkpoint.load(out / "ckpt.npz")["step"] == 2 and _leftovers(out) == []
    monkeypatch.undo()
    res = CliRunner().invoke(main, _train_args(feats, out, "--resume", str(out / "ckpt.npz")))
    assert res.exit_code == 0, res.output
    assert checkpoint.load(out / "ckpt.npz")["step"] == 6


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch):
    """Simulated (the tests may run as root, which ignores permissions): every attempt to create
    a file in the folder fails as on a read-only file system."""
    feats = _feats(tmp_path / "feats.npy")
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    res = CliRunner().invoke(main, _train_args(feats, out))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (f"error: {out}: cannot write there (Read-only file system); "
                                                   "expected a writable output folder")
    assert os.listdir(out) == []


def test_a_feature_file_truncated_between_two_steps_is_named(tmp_path, monkeypatch):
    """The file is cut in half just before the 4th batch is read (reads run a step ahead in a
    background thread, so the cut is made at the read itself, where it lands the same every run)."""
    from omh_ref.train import loop

    feats = _feats(tmp_path / "feats.npy")
    assert CliRunner().invoke(main, ["knn", "--features", feats]).exit_code == 0
    out = tmp_path / "run"
    real, calls = loop._BatchReader._read, []

    def truncating(self, idx, partners):
        calls.append(1)
        if len(calls) == 4:
            os.truncate(feats, os.path.getsize(feats) // 2)
        return real(self, idx, partners)

    monkeypatch.setattr(loop._BatchReader, "_read", truncating)
    res = CliRunner().invoke(main, _train_args(feats, out))
    assert res.exit_code == 2 and "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {feats}: the feature file shrank from ") and "cannot be read" in last
    assert checkpoint.load(out / "ckpt.npz")["step"] == 2 and _leftovers(out) == []


def test_two_feature_files_in_one_folder_keep_their_own_knn_tables(tmp_path):
    a, b = _feats(tmp_path / "train.npy", seed=0), _feats(tmp_path / "val.npy", seed=1)
    for f in (a, b):
        res = CliRunner().invoke(main, _train_args(f, tmp_path / ("run_" + os.path.basename(f)[:-4])))
        assert res.exit_code == 0, res.output
    assert (tmp_path / "train.knn.npy").exists() and (tmp_path / "val.knn.npy").exists()
    mtime = (tmp_path / "train.knn.npy").stat().st_mtime_ns
    res = CliRunner().invoke(main, _train_args(a, tmp_path / "again"))
    assert res.exit_code == 0 and "building" not in res.output
    assert (tmp_path / "train.knn.npy").stat().st_mtime_ns == mtime     # reused, not rebuilt


def test_a_legacy_knn_table_is_read_when_its_fingerprint_matches(tmp_path):
    from omh_ref.features.knn import build_knn
    from omh_ref.features.store import FeatureStore

    feats = _feats(tmp_path / "feats.npy")
    build_knn(FeatureStore(feats), tmp_path / "knn.npy", k=7)
    res = CliRunner().invoke(main, _train_args(feats, tmp_path / "run"))
    assert res.exit_code == 0 and "building" not in res.output
    assert checkpoint.load(tmp_path / "run" / "ckpt.npz")["info"]["knn"] == str((tmp_path / "knn.npy").resolve())
    np.save(feats, np.random.default_rng(5).standard_normal((16, 4, 5, 7)).astype(np.float32))   # another file
    res = CliRunner().invoke(main, _train_args(feats, tmp_path / "run2"))
    assert res.exit_code == 0 and "building" in res.output and (tmp_path / "feats.knn.npy").exists()

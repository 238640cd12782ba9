"""One writer per work folder: a second process fails at once naming the holder; a dead holder's lock is
taken over; ranks of one torchrun job share it; another host's lock offers --force-unlock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from weakclip.cli import main
from weakclip.workdir_lock import LOCK_NAME, FolderInUse, WorkdirLock, workdir_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")

# takes the lock of argv[1] as 'weakclip run', says so, and sleeps until it is killed
_HOLDER = """
import sys, time
from weakclip.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1], "weakclip run"):
    print("held", flush=True)
    time.sleep(120)
"""


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path/'w' (started, its lock written)."""
    procs = []

    def start(folder: Path, **env):
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(**env))
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == "held", proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _record(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


# every command that writes into a folder, with that folder at tmp/'w' (the other paths need not exist:
# the lock is taken before any of them is looked at)
_WRITERS = {
    "run": ["run", "--data-root", "{d}", "--workdir", "{w}"],
    "demo": ["demo", "--workdir", "{w}", "--small"],
    "train": ["train", "--data-root", "{d}", "--seeds", "{d}", "--workdir", "{w}"],
    "retrain": ["retrain", "--data-root", "{d}", "--masks", "{d}", "--workdir", "{w}"],
    "pseudo-masks": ["pseudo-masks", "--checkpoint", "{d}", "--data-root", "{d}", "--out", "{w}"],
    "seeds": ["seeds", "--data-root", "{d}", "--clip-weights", "{d}/c.pt", "--out", "{w}"],
    "predict": ["predict", "{d}", "--checkpoint", "{d}", "--out", "{w}"],
    "report": ["report", "{w}"],
}


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, holder):
    work = tmp_path / "w"
    proc = holder(work)
    rec = _record(work)
    assert rec["pid"] == proc.pid and rec["host"] == socket.gethostname() and rec["command"] == "weakclip run"
    # a second real process: the CLI fails in one line, exit status 2, the holder's lock untouched
    second = subprocess.run([sys.executable, "-m", "weakclip", "report", str(work)], capture_output=True,
                            text=True, env=_env(), timeout=120)
    assert second.returncode == 2
    err = second.stderr.strip()
    assert "\n" not in err and err.startswith("weakclip report: error: the work folder")
    assert f"'weakclip run' (pid {proc.pid} on host {socket.gethostname()}, started 20" in err
    assert "wait for it to end" in err
    assert _record(work) == rec and proc.poll() is None


@pytest.mark.parametrize("command", sorted(_WRITERS))
def test_every_writing_command_takes_the_lock(tmp_path, holder, capsys, command):
    work, data = tmp_path / "w", tmp_path / "no-data"
    proc = holder(work)
    argv = [a.format(w=work, d=data) for a in _WRITERS[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"is in use by 'weakclip run' (pid {proc.pid} on host" in err and "\n" not in err
    assert sorted(p.name for p in work.iterdir()) == [LOCK_NAME]  # nothing was started


def test_a_dead_holders_lock_is_taken_over(tmp_path, holder, capsys):
    work = tmp_path / "w"
    proc = holder(work)
    os.kill(proc.pid, signal.SIGKILL)  # as a crash or kill -9 leaves it
    proc.wait()
    assert (work / LOCK_NAME).is_file()
    main(["report", str(work), "--quiet"])  # an empty folder: the report itself fails, after the lock
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if line.startswith("note: taking over")]
    assert len(note) == 1 and f"pid {proc.pid}" in note[0] and "no longer running" in note[0]
    assert not (work / LOCK_NAME).exists()  # released again at the end


def test_a_reused_pid_is_not_the_holder(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    # our own pid, but another process start time: the process that wrote it is gone
    (work / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "pid_start": "1", "command": "weakclip train", "started": 0}))
    with workdir_lock(work, "weakclip train", note=print) as lock:
        assert lock.held and _record(work)["token"] == lock.token
    assert "no longer running" in capsys.readouterr().out
    assert not (work / LOCK_NAME).exists()


def test_the_holding_process_takes_it_again_without_deadlock(tmp_path):
    work = tmp_path / "w"
    with workdir_lock(work, "weakclip run") as outer:
        with workdir_lock(work, "weakclip run") as inner:  # e.g. a stage inside `run`
            assert not inner.held
        assert (work / LOCK_NAME).is_file() and _record(work)["token"] == outer.token
    assert not (work / LOCK_NAME).exists()


def test_another_hosts_lock_names_the_host_and_force_unlock_takes_it(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / LOCK_NAME).write_text(json.dumps({"host": "node-17.cluster", "pid": 4242,
                                              "command": "weakclip run", "started": 1.8e9}))
    assert main(["report", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pid 4242 on host node-17.cluster, started 2027-01-15" in err and "on another host" in err
    assert "--force-unlock" in err and "\n" not in err
    main(["report", str(work), "--force-unlock", "--quiet"])
    err = capsys.readouterr().err
    assert "note: taking over the lock" in err and "pid 4242 on host node-17.cluster" in err
    assert ": as --force-unlock asks\n" in err
    assert not (work / LOCK_NAME).exists()


def test_ranks_of_one_torchrun_job_share_the_lock(tmp_path, holder, monkeypatch):
    work = tmp_path / "w"
    job = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29511"}
    proc = holder(work, RANK="0", **job)  # rank 0 holds it
    assert _record(work)["job"] == "abc@127.0.0.1:29511"
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "1")
    with workdir_lock(work, "weakclip run") as lock:  # rank 1 of the same job: passes, holds nothing
        assert not lock.held
    assert _record(work)["pid"] == proc.pid
    monkeypatch.setenv("MASTER_PORT", "29600")  # rank 1 of another job
    with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):
        WorkdirLock(work, "weakclip run").acquire()
    with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):  # --force-unlock: not from a live local job
        WorkdirLock(work, "weakclip run", force=True).acquire()
    monkeypatch.setenv("RANK", "0")  # and rank 0 of another job
    with pytest.raises(FolderInUse, match="wait for it to end"):
        WorkdirLock(work, "weakclip run").acquire()


def test_the_lock_is_released_on_errors_and_ctrl_c(tmp_path, monkeypatch, capsys):
    import weakclip.report.analysis as analysis

    work = tmp_path / "w"
    work.mkdir()

    def interrupted(*args, **kwargs):
        assert (work / LOCK_NAME).is_file()  # held while the command runs
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis, "analyse", interrupted)
    assert main(["report", str(work)]) == 130
    assert not (work / LOCK_NAME).exists() and work.is_dir()


def test_folders_made_for_the_lock_go_again_when_the_command_fails(tmp_path, capsys):
    work = tmp_path / "a" / "b"
    assert main(["train", "--data-root", str(tmp_path / "missing"), "--seeds", str(tmp_path),
                 "--workdir", str(work)]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_force_unlock_never_takes_the_lock_of_a_live_process_on_this_host(tmp_path, holder, capsys):
    # issue 27.1: `weakclip report w --force-unlock` while a demo runs in w took its lock and exited 0
    work = tmp_path / "w"
    proc = holder(work)
    rec = _record(work)
    for _ in range(2):  # and a second time: the lock is still the holder's
        assert main(["report", str(work), "--force-unlock"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "note: taking over" not in err
        assert f"is in use by 'weakclip run' (pid {proc.pid} on host {socket.gethostname()}" in err
        assert "still running on this host" in err and "--force-unlock" in err
        assert _record(work) == rec and proc.poll() is None
    with pytest.raises(FolderInUse, match="still running on this host"):
        WorkdirLock(work, "weakclip run", force=True).acquire()
    assert _record(work) == rec


@pytest.mark.parametrize("content", ["", "{\"host\": \"x", "[1, 2]", "unreadable"])
def test_an_empty_or_unreadable_lock_file_is_stale(tmp_path, capsys, monkeypatch, content):
    # issue 27.1: a 0-byte lock read as "in use on another host" (and an unreadable one as a traceback)
    work = tmp_path / "w"
    work.mkdir()
    lock = work / LOCK_NAME
    lock.write_text("" if content == "unreadable" else content)
    if content == "unreadable":
        lock.chmod(0)
        if os.access(lock, os.R_OK):  # root reads a mode-0 file: make its reading fail as it would
            read_text = Path.read_text

            def refused(self, *args, **kwargs):
                if self.name.startswith(LOCK_NAME) and self.stat().st_mode & 0o777 == 0:
                    raise PermissionError(13, "Permission denied", str(self))
                return read_text(self, *args, **kwargs)

            monkeypatch.setattr(Path, "read_text", refused)
    main(["report", str(work), "--quiet"])  # an empty folder: the report itself fails, after the lock
    err = capsys.readouterr().err
    assert "on another host" not in err and "Traceback" not in err
    note = [line for line in err.splitlines() if line.startswith("note: taking over")]
    assert len(note) == 1 and "no holder could be read from it" in note[0], err
    assert not lock.exists()


def test_a_rank_ignores_an_empty_lock_file(tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (work / LOCK_NAME).write_text("")
    for key, value in {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    with workdir_lock(work, "weakclip run") as lock:
        assert not lock.held

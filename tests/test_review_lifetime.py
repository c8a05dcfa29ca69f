"""Review findings on the lifetime rules (each test fails on the code it was written against).

Every scenario runs in a child interpreter with a runtime dir of its own, so nothing
it leaves (the bugs are leaks and stuck locks) reaches the session's leak check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux runtime dir")


def _run(tmp_path, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    env = {**os.environ, "SHAREIT_RUNTIME_DIR": str(rt)}
    script = tmp_path / "scenario.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(tmp_path))


def test_fork_while_another_thread_holds_the_name_lock_does_not_wedge_the_name(tmp_path):
    """name_lock's flock fd is inherited by a child forked while another thread holds it
    (e.g. a Pool's worker-handler thread forking a replacement worker while the main
    thread opens or closes a mapping): the child keeps the lock for its whole life, so
    every open/close/gc of the name in every process times out."""
    r = _run(tmp_path, """
        import os, threading, time
        import shareit
        from shareit import _lifetime
        d = shareit.open("fl")
        held, release = threading.Event(), threading.Event()
        def opener():                      # stands for an open()/close() in another thread
            with _lifetime.name_lock("fl", 5):
                held.set(); release.wait()
        th = threading.Thread(target=opener); th.start(); held.wait()
        pid = os.fork()
        if pid == 0:                       # a long-lived child (a worker)
            time.sleep(20); os._exit(0)
        release.set(); th.join()
        try:
            shareit.open("fl", timeout=1.0).close()
            print("OPEN-OK")
        except Exception as exc:
            print("OPEN-FAILED", repr(exc))
        finally:
            os.kill(pid, 9); os.waitpid(pid, 0)
            d.close()
    """)
    assert "OPEN-OK" in r.stdout, r.stdout + r.stderr


def test_threads_opening_and_closing_one_name_never_drop_a_live_handle(tmp_path):
    """leave() decides "no more uses here" before taking the name lock; an open() in
    another thread that registers in between is then erased from the users (or, with no
    keeper, the mapping is removed under its open handle: the next opener creates a
    second copy)."""
    r = _run(tmp_path, """
        import os, threading, time
        import shareit
        from shareit import _runtime
        stop = time.monotonic() + 8
        bad = []
        def churn():
            while time.monotonic() < stop and not bad:
                shareit.open("thr").close()
        def holder():
            while time.monotonic() < stop and not bad:
                d = shareit.open("thr")
                time.sleep(0.001)
                rec = _runtime.read_meta_quiet("thr")
                if rec is None or rec["created"] != d._created:
                    bad.append("mapping removed under an open handle")
                elif os.getpid() not in [u[0] for u in rec["users"]]:
                    bad.append("a process with an open handle is not among the users")
                d.close()
        ts = [threading.Thread(target=churn), threading.Thread(target=holder)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("BAD" if bad else "OK", bad[:1])
    """)
    assert r.stdout.startswith("OK"), r.stdout + r.stderr


def test_shm_mapping_used_by_a_pool_is_removed_when_everyone_is_done(tmp_path):
    """The common pattern `with Pool() as pool: with shareit.open(...) as d: pool.map(f,
    [d]*n)`: the workers (users since they received d) never leave -- forked workers
    end with os._exit, and Pool.__exit__ terminates them -- so no one removes the shm
    mapping: its record and segments stay until `shareit gc`."""
    r = _run(tmp_path, """
        import os, time, multiprocessing as mp
        import shareit
        from shareit import _runtime
        def f(d):
            return d.incr("n")
        if __name__ == "__main__":
            with mp.get_context("fork").Pool(2) as pool:
                with shareit.open("pl") as d:
                    pool.map(f, [d] * 4)
    """)
    assert r.returncode == 0, r.stderr
    left = os.listdir(tmp_path / "rt" / f"shareit-{os.geteuid()}")
    assert left == [], f"left after everyone exited: {left}"


def test_shm_mapping_forked_children_outliving_a_closed_parent_is_removed(tmp_path):
    """A parent passes d to two forked Processes and closes its own handle before they
    finish; the children are the last users but never leave (os._exit), so the mapping
    stays behind after everyone has exited."""
    r = _run(tmp_path, """
        import os, time, multiprocessing as mp
        import shareit
        from shareit import _runtime
        def f(d):
            d.incr("n")
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            d = shareit.open("pr")
            ps = [ctx.Process(target=f, args=(d,)) for _ in range(2)]
            [p.start() for p in ps]
            d.close()
            [p.join() for p in ps]
    """)
    assert r.returncode == 0, r.stderr
    left = os.listdir(tmp_path / "rt" / f"shareit-{os.geteuid()}")
    assert left == [], f"left after everyone exited: {left}"


@pytest.mark.parametrize("backend", ["shm", "manager"])
def test_handle_in_flight_to_a_spawned_process_survives_the_senders_close(tmp_path, backend):
    """`Process(target=f, args=(d,)).start(); d.close()` with spawn: the child is not a
    user until it has unpickled d, so the sender's close removes the mapping and the
    child dies with BackendDiedError -- although it "receives a handle"."""
    r = _run(tmp_path, f"""
        import multiprocessing as mp
        import shareit
        def f(d):
            d.incr("n")
        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            d = shareit.open("sp", backend={backend!r})
            p = ctx.Process(target=f, args=(d,))
            p.start()
            d.close()
            p.join()
            print("EXIT", p.exitcode)
    """)
    assert "EXIT 0" in r.stdout, r.stdout + r.stderr


def test_one_child_reopening_a_name_does_not_make_its_parent_a_keeper(tmp_path):
    """The keeper rule is for a parent that started two or more users, but add_me counts
    *registrations*: one child that opens, closes and reopens the name (while another
    user keeps it alive) is counted twice, so its plain parent becomes the keeper and
    the mapping outlives everyone (its files stay after the parent exits too)."""
    r = _run(tmp_path, """
        import subprocess, sys
        import shareit
        from shareit import _runtime
        d = shareit.open("kp")                       # this script is a user
        child = subprocess.Popen([sys.executable, "-c", '''
        import sys, shareit
        shareit.open("kp").close()                   # one child: open, close,
        e = shareit.open("kp")                       # and open again
        print("ready", flush=True); sys.stdin.readline(); e.close()
        '''.replace("\\n        ", "\\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        d.close()                                    # the child is the last user
        child.stdin.write("\\n"); child.stdin.flush(); child.wait()
        rec = _runtime.read_meta_quiet("kp")
        print("RECORD", None if rec is None else {"users": rec["users"],
                                                   "keeper": rec.get("keeper"),
                                                   "parents": rec["parents"]})
    """)
    assert "RECORD None" in r.stdout, r.stdout + r.stderr

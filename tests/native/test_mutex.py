"""_native.Mutex, the producer's lock, against its reference threading.Lock: the same answers
to the calls Producer and threading.Condition make, mutual exclusion under contention from
threads that give up the GIL inside the critical section, and signal handlers that run while
an acquire sleeps."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from shmbroker.native import _native

LOCKS = {"threading.Lock": threading.Lock, "_native.Mutex": _native.Mutex}


@pytest.fixture(params=sorted(LOCKS))
def make_lock(request):
    return LOCKS[request.param]


def test_acquire_release_and_locked_answer_as_threading_lock(make_lock):
    lock = make_lock()
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    assert lock.acquire(False) is False
    assert lock.acquire(blocking=False) is False
    lock.release()
    assert not lock.locked()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


def test_bad_arguments_are_refused_as_threading_lock_refuses_them(make_lock):
    lock = make_lock()
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-5)
    with pytest.raises(TypeError):
        lock.acquire(True, 1.0, 3)
    with pytest.raises(TypeError):
        lock.acquire(bogus=1)
    assert not lock.locked()  # nothing was taken by a refused call


def test_a_timed_acquire_of_a_held_lock_gives_up_after_its_timeout(make_lock):
    lock = make_lock()
    lock.acquire()
    t0 = time.monotonic()
    assert lock.acquire(timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.045
    assert lock.acquire(True, 0) is False
    lock.release()
    assert lock.acquire(timeout=0.05) is True
    lock.release()


def test_threads_that_give_up_the_gil_inside_the_critical_section_lose_no_update(make_lock):
    lock, threads_n, rounds = make_lock(), 8, 400
    counter = [0]
    start = threading.Barrier(threads_n)

    def work():
        start.wait(10)
        for _ in range(rounds):
            with lock:
                seen = counter[0]
                time.sleep(0)  # the GIL goes: without exclusion another thread writes here
                counter[0] = seen + 1

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert counter[0] == threads_n * rounds
    assert not lock.locked()


def test_a_release_from_another_thread_wakes_a_sleeping_acquire(make_lock):
    lock = make_lock()
    lock.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=10)))
    t.start()
    time.sleep(0.05)  # let it sleep on the lock
    assert got == []
    lock.release()
    t.join(10)
    assert got == [True]
    assert lock.locked()  # now held by the thread that woke
    lock.release()


def test_condition_wait_and_notify_work_on_it(make_lock):
    lock = make_lock()
    cond = threading.Condition(lock)
    state = {"ready": False}

    def later():
        time.sleep(0.02)
        with cond:
            state["ready"] = True
            cond.notify_all()

    t = threading.Thread(target=later)
    with cond:
        t.start()
        assert cond.wait_for(lambda: state["ready"], timeout=10)
        assert lock.locked()
    t.join(10)
    assert not lock.locked()


class _Interrupted(Exception):
    pass


def test_a_signal_handler_runs_while_an_acquire_sleeps_and_its_exception_ends_the_wait(
        make_lock):
    lock = make_lock()
    lock.acquire()

    def handler(signum, frame):
        raise _Interrupted()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        with pytest.raises(_Interrupted):
            lock.acquire(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert lock.locked()
    lock.release()

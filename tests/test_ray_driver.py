"""The driver's own CPU (issue 26): Ray Data's scheduling loop wakes on a finished task, not ten
times a second, and a run through it gives the same rows."""

from __future__ import annotations

import time

from counterfactory.pipeline import ray_driver


def test_wait_returns_at_the_first_finished_task_with_every_other_ready_one(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def after(s: float) -> float:
        time.sleep(s)
        return s

    fast, also, slow, slow2 = after.remote(0.0), after.remote(0.0), after.remote(30.0), after.remote(30.0)
    ray.get([fast, also])
    ev = ray_driver._EventWait(ray)
    t0 = time.perf_counter()
    ready, rest = ev.wait([slow, fast, also], num_returns=3, timeout=20.0, fetch_local=False)
    assert time.perf_counter() - t0 < 5
    assert set(ready) == {fast, also} and rest == [slow]
    t0 = time.perf_counter()  # nothing finishes: back after IDLE_WAKE_S, not the caller's timeout
    ready, rest = ev.wait([slow], num_returns=1, timeout=0.1, fetch_local=False)
    assert ready == [] and rest == [slow]
    ready, rest = ev.wait([slow, slow2], num_returns=2, timeout=0.1, fetch_local=False)
    assert ready == [] and len(rest) == 2 and time.perf_counter() - t0 < 5
    for ref in (slow, slow2):
        ray.cancel(ref, force=True)


def test_executor_loop_passes_follow_tasks_not_the_clock(ray_local):
    """A dataset of two tasks of 2 s each: Ray Data's loop, wrapped, makes a handful of passes
    (each finished task, and an idle wake every 0.5 s); unwrapped it makes ~10 a second."""
    import ray.data
    from ray.data._internal.execution import streaming_executor_state as state

    assert ray_driver.event_driven_executor() and ray_driver.event_driven_executor()  # idempotent
    calls = []
    real = state.ray.wait

    def counted(*a, **kw):
        calls.append(time.perf_counter())
        return real(*a, **kw)

    state.ray.wait = counted
    try:
        def slow(batch):
            time.sleep(2.0)
            return batch

        t0 = time.perf_counter()
        rows = ray.data.range(2, override_num_blocks=2).map_batches(slow, batch_size=1).take_all()
        wall = time.perf_counter() - t0
    finally:
        del state.ray.wait
    assert sorted(r["id"] for r in rows) == [0, 1]
    # 2 finished tasks and an idle wake every 0.5 s: ~2 a second; a little room for a loaded
    # machine (the unwrapped loop's 0.1 s poll makes ~10 a second)
    assert len(calls) <= 5 * wall + 4, f"{len(calls)} loop passes in {wall:.1f} s"

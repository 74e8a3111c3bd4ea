"""The driver's share of a Ray Data run kept small (issue 26): the driver only commits metadata,
so what it burns is Ray Data's own loop, per wall second, whatever the shards cost.

Ray Data 2.60's streaming executor polls: each pass of its scheduling loop ends in
``ray.wait(every active task, num_returns=all of them, timeout=0.1 s)``, which with tasks that
each yield one small row at their end almost always runs to its timeout, so the loop (resource
accounting, operator selection, metrics; ~1 ms a pass) runs ten times a second and still notices
a finished task up to 0.1 s late. ``event_driven_executor`` makes that wait return at the first
finished task (then collects every other ready one at once) and otherwise wakes every
``IDLE_WAKE_S``: a task's end is seen at once, and an idle pass costs a few per second. Ray's
public ``ray.wait`` is untouched; only the executor module's reference to ``ray`` is wrapped.

Two more pollers go with it: a task's output metadata is fetched in the loop itself (Ray Data's
own switch, ``RAY_DATA_METADATA_PREFETCH_ON_THREAD=0``), since the background fetcher (another
0.1 s poll) would hand a finished task back only at the loop's next pass; and the consumer's
wait for the next output, a 10 ms sleep loop, sleeps ``CONSUMER_POLL_S`` instead (the driver only
commits a shard's small entry: 50 ms later costs nothing).
"""

from __future__ import annotations

import types
from typing import Any

# how often the executor's loop still runs when no task ends (its timers: autoscaling, the
# no-progress guard, metrics, are per second or slower)
IDLE_WAKE_S = 0.5
# set to 1: Ray Data's loop left as it is (a comparison, or a Ray Data whose internals moved)
POLLING_ENV = "COUNTERFACTORY_RAY_DATA_POLLING"
CONSUMER_POLL_S = 0.05


class _EventWait(types.ModuleType):
    """``ray`` as Ray Data's executor state module sees it, with ``wait`` returning early."""

    def __init__(self, ray: Any) -> None:
        super().__init__("ray")
        self._ray = ray

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)

    def wait(self, refs: list[Any], *, num_returns: int = 1, timeout: float | None = None,
             fetch_local: bool = True) -> tuple[list[Any], list[Any]]:
        wait = self._ray.wait
        if timeout is None or timeout <= 0 or not refs:
            return wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)
        ready, rest = wait(refs, num_returns=1, timeout=max(timeout, IDLE_WAKE_S), fetch_local=fetch_local)
        if ready and rest:  # every other task already done: handled in the same pass
            more, rest = wait(rest, num_returns=min(len(rest), num_returns - 1), timeout=0, fetch_local=fetch_local)
            ready += more
        return ready, rest


class _SlowPoll(types.ModuleType):
    """``time`` as the executor state module sees it: its consumer's poll sleeps longer."""

    def __init__(self, time_mod: Any) -> None:
        super().__init__("time")
        self._time = time_mod

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)

    def sleep(self, seconds: float) -> None:
        self._time.sleep(max(seconds, CONSUMER_POLL_S))


def event_driven_executor() -> bool:
    """Wrap the executor's ``ray.wait`` (idempotent); False where this Ray Data has no such
    module (another version): then nothing changes and the run is only costlier to drive."""
    import time

    try:
        import ray
        from ray.data._internal.execution import metadata_fetcher
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError:
        return False
    if isinstance(getattr(state, "ray", None), _EventWait):
        return True
    if (getattr(state, "ray", None) is not ray or getattr(state, "time", None) is not time
            or not hasattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
            or not hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD")):
        return False
    metadata_fetcher._PREFETCH_ON_THREAD = False
    state.time = _SlowPoll(time)
    state.ray = _EventWait(ray)
    return True

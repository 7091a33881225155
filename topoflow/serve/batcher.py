"""Adaptive micro-batching: concurrent requests' events go through one call together.

Serving costs much per call: the features of one raw event take ≈ 12 ms to compute, of 60 events
≈ 1 ms each; a GRU event costs 1.3–1.6× more alone than in a batch of 64 (ONNX Runtime here); and
one call per request queues requests behind each other. :class:`Batcher` lets a request wait for
others to join it, runs the batch in one worker thread so that the event loop keeps reading
requests meanwhile, and hands each request its own result. Adaptive: a batch waits for company
only when some is likely, requests on their way (being checked, :meth:`Batcher.coming`) or a crowd
(the last batch held several), and at most ``max_wait_s`` after its oldest request or until
``max_events`` have come; a lone client's request does not wait at all. Requests that arrive while a
batch runs form the next one, so batches grow with the load.

One request's failure never fails the others: a batch that raises runs again one request at a
time, and only a request that raises alone gets the error (so a stream of bad requests costs at
most what unbatched serving would).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from prometheus_client import Histogram

#: What the batches merged (KServe serves them on /metrics): ``_count`` is batches, ``_sum`` the events
#: and requests they held, so requests / batches says how much batching merged.
BATCH_EVENTS = Histogram("topoflow_batch_events", "events per batch", buckets=(1, 4, 16, 64, 256, 1024, 4096))
BATCH_REQUESTS = Histogram("topoflow_batch_requests", "requests merged into one batch",
                           buckets=(1, 2, 4, 8, 16, 32, 64))


@dataclass
class _Job:
    item: Any
    events: int
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """``await batcher(item, events)``: this item's entry of ``run([item, ...])``, computed in one call
    with the items of concurrent requests (``events`` counts towards ``max_events``)."""

    def __init__(self, run: Callable[[list], list], max_events: int, max_wait_s: float):
        self._run_batch, self.max_events, self.max_wait_s = run, max_events, max_wait_s
        self._queue: deque[_Job] = deque()
        self._queued_events = self._coming = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="topoflow-batch")  # one batch at a time

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Around the work that precedes a request's call (checking it): batches wait for such requests."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            self._arrived.set()  # it may not come (a bad request): the worker looks again

    async def __call__(self, item: Any, events: int) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(item, events, loop.time(), loop.create_future())
        self._queue.append(job)
        self._queued_events += events
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await job.future

    async def _work(self) -> None:
        loop, busy = asyncio.get_running_loop(), False
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            while (self._coming or busy) and self._queued_events < self.max_events:  # company likely: wait a bit
                left = self._queue[0].arrived + self.max_wait_s - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            jobs = self._take()
            busy = len(jobs) > 1  # requests come in crowds: the next batch waits for more, even unannounced
            BATCH_EVENTS.observe(sum(j.events for j in jobs))
            BATCH_REQUESTS.observe(len(jobs))
            for job, result in zip(jobs, await loop.run_in_executor(self._thread, self._run, jobs)):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _take(self) -> list[_Job]:
        """The oldest requests, up to ``max_events`` events (at least one request, whatever its size)."""
        jobs = [self._queue.popleft()]
        events = jobs[0].events
        while self._queue and events + self._queue[0].events <= self.max_events:
            jobs.append(self._queue.popleft())
            events += jobs[-1].events
        self._queued_events -= events
        return jobs

    def _run(self, jobs: list[_Job]) -> list:
        """Each job's result, or the exception it raises (in the worker thread)."""
        try:
            return self._run_batch([j.item for j in jobs])
        except Exception as e:  # whatever it is, it must reach only the request that causes it
            return [e] if len(jobs) == 1 else [self._run([j])[0] for j in jobs]

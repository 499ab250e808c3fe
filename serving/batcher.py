"""Dynamic batching: rows of requests that arrive close together share one model call.

Each signature has its own queue. A worker per signature takes the oldest
request, then adds the requests already waiting or arriving within
`timeout_s` (counted from when both that request and the model are free) up
to `max_batch` rows, concatenates their inputs along the batch dimension,
runs the model once in a worker thread (so the event loop keeps accepting and
answering), and hands each request its own rows back.

Why this is safe for answers: the export computes every row independently of
its batch-mates (greedy rows, and sampled rows keyed by their own seed), and
int outputs padded with -1 are trimmed back to each request's own width, so a
request gets the same answer batched or alone. If a batch's call fails, each
request in it is rerun alone, so one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]
ModelCall = Callable[[str, Arrays], Arrays]
PAD = -1  # the padding of int outputs such as token_ids
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More rows are waiting than --max-queue allows: the server is overloaded."""


@dataclasses.dataclass
class _Pending:
    inputs: Arrays
    rows: int
    arrived: float
    future: asyncio.Future


class Batcher:
    """Queues requests per signature and runs them in shared model calls."""

    def __init__(
        self, call: ModelCall, max_batch: int = 32, timeout_s: float = 0.005, max_queue: int = 1024
    ):
        self.call, self.max_batch, self.timeout_s, self.max_queue = (
            call,
            max_batch,
            timeout_s,
            max_queue,
        )
        self.queued_rows = 0
        self.batches = 0  # model calls made and rows they ran: /healthz shows them
        self.rows = 0
        self._queues: dict[str, asyncio.Queue[_Pending]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._carry: dict[str, _Pending | None] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")

    async def submit(self, signature: str, inputs: Arrays, rows: int) -> Arrays:
        """Run `rows` rows of `inputs` (one request) through `signature`; its own outputs."""
        if rows > self.max_batch:  # larger requests go in chunks of at most max_batch rows
            if self.queued_rows + rows > self.max_queue:
                raise QueueFull(self._full_message(rows))
            chunks = [
                {k: v[start : start + self.max_batch] for k, v in inputs.items()}
                for start in range(0, rows, self.max_batch)
            ]
            parts = await asyncio.gather(
                *(self._enqueue(signature, c, len(next(iter(c.values())))) for c in chunks)
            )
            return concatenate(parts)
        return await self._enqueue(signature, inputs, rows)

    async def _enqueue(self, signature: str, inputs: Arrays, rows: int) -> Arrays:
        if self.queued_rows + rows > self.max_queue:
            raise QueueFull(self._full_message(rows))
        loop = asyncio.get_running_loop()
        if signature not in self._queues:
            self._queues[signature] = asyncio.Queue()
            self._carry[signature] = None
            self._workers[signature] = loop.create_task(self._work(signature))
        item = _Pending(inputs, rows, loop.time(), loop.create_future())
        self.queued_rows += rows
        self._queues[signature].put_nowait(item)
        return await item.future

    def _full_message(self, rows: int) -> str:
        return (
            f"server busy: {self.queued_rows} rows queued and this request adds {rows} "
            f"(--max-queue {self.max_queue}); retry later"
        )

    async def _next(self, signature: str, timeout: float | None) -> _Pending | None:
        """The next live request (not abandoned by its client), waiting at most `timeout`."""
        queue = self._queues[signature]
        while True:
            if self._carry[signature] is not None:
                item, self._carry[signature] = self._carry[signature], None
            elif timeout is None:
                item = await queue.get()
            elif not queue.empty():
                item = queue.get_nowait()
            elif timeout <= 0:
                return None
            else:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    return None
            if item.future.done():  # its client went away: skip the work
                self.queued_rows -= item.rows
                continue
            return item

    async def _work(self, signature: str) -> None:
        loop = asyncio.get_running_loop()
        free_since = loop.time()
        while True:
            first = await self._next(signature, None)
            batch, rows = [first], first.rows
            # The window opens when both the oldest request and the model are there: requests
            # that queued during the last call wait a little for the clients just answered.
            deadline = max(first.arrived, free_since) + self.timeout_s
            while rows < self.max_batch:
                item = await self._next(signature, deadline - loop.time())
                if item is None:
                    break
                if rows + item.rows > self.max_batch:
                    self._carry[signature] = item  # first in the next batch
                    break
                batch.append(item)
                rows += item.rows
            self.queued_rows -= rows
            try:
                await self._run(signature, batch)
            except Exception as error:  # a bug here must not leave requests waiting forever
                log.exception("batch of %d requests failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
            free_since = loop.time()

    async def _run(self, signature: str, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        inputs = {k: np.concatenate([item.inputs[k] for item in batch]) for k in batch[0].inputs}
        try:
            outputs = await loop.run_in_executor(self._executor, self.call, signature, inputs)
            self.batches += 1
            self.rows += sum(item.rows for item in batch)
        except Exception as error:
            if len(batch) > 1:  # find the culprit: each request alone
                for item in batch:
                    await self._run(signature, [item])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        start = 0
        for item in batch:
            part = {k: trim(v[start : start + item.rows]) for k, v in outputs.items()}
            start += item.rows
            if not item.future.done():  # a client that left is simply not answered
                item.future.set_result(part)

    async def close(self) -> None:
        """Stop the workers (call after in-flight requests are answered) and the thread."""
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=True)


def trim(array: np.ndarray) -> np.ndarray:
    """Drop trailing columns that are padding in every row of an int [rows, width] array.

    A batch is padded to its longest row; trimmed, each request's slice has
    the width it would have had alone.
    """
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or array.shape[1] == 0:
        return array
    real = np.nonzero((array != PAD).any(axis=0))[0]
    return array[:, : (real[-1] + 1 if real.size else 0)]


def concatenate(parts: list[Arrays]) -> Arrays:
    """Join the outputs of a request's chunks, padding int [rows, width] arrays to one width."""
    joined = {}
    for key in parts[0]:
        arrays = [part[key] for part in parts]
        if arrays[0].ndim == 2 and np.issubdtype(arrays[0].dtype, np.integer):
            width = max(a.shape[1] for a in arrays)
            arrays = [
                np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=PAD) for a in arrays
            ]
        joined[key] = np.concatenate(arrays)
    return joined

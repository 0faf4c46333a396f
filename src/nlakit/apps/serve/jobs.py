"""One worker, a FIFO of jobs: model work never runs twice at the same time.

Requests are served concurrently by the web server, but every piece of model compute (a
forward pass, a generation, a reconstruction) is a job run by the single worker thread, so two
generations never compete for the CPU. A job reports its place in the queue while it waits and
its progress (done of total, plus partial results) while it runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from nlakit.apps.serve.limits import RequestError
from nlakit.errors import NLAError

log = logging.getLogger(__name__)

KEEP_FINISHED = 200  # finished jobs kept for GET /api/jobs/{id}


@dataclass
class Job:
    id: str
    kind: str
    fn: Callable  # fn(job) -> result; may call job.progress(...)
    total: int = 1
    done: int = 0
    status: str = "queued"  # queued, running, done, error
    partial: list = field(default_factory=list)
    result: object = None
    error: dict | None = None
    error_status: int = 500
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    queue_position_at_submit: int = 0
    future: Future = field(default_factory=Future)

    def progress(self, done: int, items: list | None = None) -> None:
        """Called by the job's function from the worker: `done` of `total`, new results."""
        if items:
            self.partial.extend(items)
        self.done = done


class JobQueue:
    """FIFO of jobs run one at a time by one daemon worker thread."""

    def __init__(self, max_queue: int = 32):
        self.max_queue = int(max_queue)
        self._pending: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self.max_depth = 0  # most jobs in the system (running + waiting) seen at a submit
        self.completed = 0
        self._thread = threading.Thread(target=self._work, name="nlakit-serve-worker",
                                        daemon=True)
        self._thread.start()

    # ---- submitting and looking up -----------------------------------------------------

    def submit(self, kind: str, fn: Callable, total: int = 1) -> Job:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise RequestError(f"the job queue is full ({len(self._pending)} waiting); the "
                                   f"limit max_queue is {self.max_queue}; retry later",
                                   status=429, limit="max_queue", value=len(self._pending) + 1,
                                   maximum=self.max_queue)
            job = Job(id=f"{next(self._ids)}", kind=kind, fn=fn, total=max(1, int(total)))
            self._pending.append(job)
            self._jobs[job.id] = job
            job.queue_position_at_submit = self._position(job)
            depth = len(self._pending) + (self._running is not None)
            self.max_depth = max(self.max_depth, depth)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def _position(self, job: Job) -> int:
        """The job's place in the waiting line: 1 = next to run; 0 once it runs or ran."""
        if job.status != "queued":
            return 0
        return next(i for i, j in enumerate(self._pending) if j is job) + 1

    def position(self, job: Job) -> int:
        with self._cond:
            return self._position(job)

    def state(self) -> dict:
        with self._cond:
            return {"running": self._running.id if self._running else None,
                    "running_kind": self._running.kind if self._running else None,
                    "waiting": [j.id for j in self._pending], "max_queue": self.max_queue,
                    "max_depth_seen": self.max_depth, "completed": self.completed}

    def describe(self, job: Job, *, since: int = 0) -> dict:
        """The JSON view of a job; `partial` holds results from index `since` on."""
        with self._cond:
            pos = self._position(job)
            ahead = (pos - 1 + (self._running is not None)) if pos else 0
            out = {"job_id": job.id, "kind": job.kind, "status": job.status,
                   "queue_position": pos, "jobs_ahead": ahead, "queue_position_at_submit":
                   job.queue_position_at_submit, "done": job.done, "total": job.total,
                   "partial": list(job.partial[since:]), "partial_from": since,
                   "submitted_at": job.submitted_at, "started_at": job.started_at,
                   "finished_at": job.finished_at}
        if job.status == "done":
            out["result"] = job.result
        if job.status == "error":
            out["error"] = job.error
        return out

    # ---- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._pending.popleft()
                self._running = job
                job.status, job.started_at = "running", time.time()
            try:
                result = job.fn(job)
            except RequestError as e:
                self._finish(job, error=e.payload(), status=e.status)
            except NLAError as e:
                self._finish(job, error={"error": str(e)}, status=422)
            except Exception as e:  # a job's failure must not kill the worker
                log.exception("job %s (%s) failed", job.id, job.kind)
                self._finish(job, error={"error": f"internal error: {type(e).__name__}: {e}"},
                             status=500)
            else:
                self._finish(job, result=result)

    def _finish(self, job: Job, *, result=None, error=None, status: int = 500) -> None:
        with self._cond:
            job.finished_at = time.time()
            job.result, job.error, job.error_status = result, error, status
            job.status = "error" if error is not None else "done"
            if error is None:
                job.done = job.total
            self._running = None
            self.completed += 1
            self._finished.append(job.id)
            while len(self._finished) > KEEP_FINISHED:
                self._jobs.pop(self._finished.popleft(), None)
        if error is not None:
            job.future.set_exception(RequestError(error["error"], status=status,
                                                  limit=error.get("limit"),
                                                  value=error.get("value"),
                                                  maximum=error.get("max")))
        else:
            job.future.set_result(result)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

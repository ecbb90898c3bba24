"""A worker process's presence: a thread that records a beat (device, GPU memory) every ``heartbeat_s``.

Each process that runs jobs starts one: every embedded local worker process, each Celery prefork pool
process (``worker_process_init``) and the main process of a solo or threads pool (``worker_ready``).
The API reads the rows for ``/metrics`` and ``/api/v1/workers``, so nothing is pushed anywhere and no
port is opened on the worker hosts: the database the workers already write to carries the figures.

The beat never initialises CUDA: before the process's first job has used the GPU it reports no device
and no GPU memory (a prefork parent must not touch CUDA before it forks).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records.db import get_sessionmaker
from embedseg_service.records.settings import Settings
from embedseg_service.records.workers import Beat, forget, record_beat
from embedseg_service.worker.devices import device_label
from embedseg_service.worker.runner import worker_name

log = logging.getLogger(__name__)


def device_use() -> tuple[str | None, int | None, int | None]:
    """(device, GPU memory held, GPU memory in all) of this process, without initialising CUDA.

    ``("cuda:N", reserved, total)`` once the process has used CUDA (N as this process numbers its
    visible devices, with ``CUDA_VISIBLE_DEVICES`` appended when set), ``("cpu", None, None)`` once it
    has imported torch without using CUDA, and ``(None, None, None)`` before.
    """
    torch = sys.modules.get("torch")
    if torch is None or getattr(torch.__spec__, "_initializing", False) or not hasattr(torch, "cuda"):
        return None, None, None  # not imported, or still being imported by the job's thread
    if not torch.cuda.is_initialized():
        return "cpu", None, None
    index = torch.cuda.current_device()
    _, total = torch.cuda.mem_get_info(index)
    return device_label(index), int(torch.cuda.memory_reserved(index)), int(total)


class Presence:
    """Records this process's beat now and every ``settings.heartbeat_s`` in a daemon thread."""

    def __init__(
        self, settings: Settings, *, queues: str | None = None, sessions: sessionmaker[Session] | None = None
    ) -> None:
        self.settings = settings
        self.queues = queues
        self.sessions = sessions or get_sessionmaker(settings)
        self.name = worker_name()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Record one beat; an error is logged, not raised (the next beat tries again)."""
        try:
            device, held, total = device_use()
        except Exception as error:  # a CUDA query failing must not stop the beats
            log.warning("worker beat: device not read: %s: %s", type(error).__name__, error)
            device, held, total = None, None, None
        beat = Beat(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), queues=self.queues,
            device=device, gpu_memory_bytes=held, gpu_memory_total_bytes=total,
        )  # fmt: skip
        try:
            with self.sessions() as session:
                record_beat(session, beat)
        except Exception as error:  # the database briefly unreachable
            log.warning("worker beat: %s: %s", type(error).__name__, error)

    def start(self) -> Presence:
        """Beat now, then in a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="embedseg-presence", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove this process's row."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            with self.sessions() as session:
                forget(session, self.name)
        except Exception as error:
            log.warning("worker row not removed: %s: %s", type(error).__name__, error)

"""EmbedSeg Service: EmbedSeg instance segmentation (2D and 3D) as a library, a CLI and a REST service.

Sub-packages, each importable on its own and cheap to import (torch loads only when a job or a
torch-backed function runs):

- :mod:`embedseg_service.core`: the method (model, training, inference, data, metrics) and the
  ``embedseg`` command line; imports nothing of the service.
- :mod:`embedseg_service.records`: what the API and the workers share (settings, database tables,
  job state machine, storage, job specs, broker settings); imports neither FastAPI nor Celery.
- :mod:`embedseg_service.api`: the HTTP front end and dashboard (FastAPI).
- :mod:`embedseg_service.worker`: the job runner, its handlers, the Celery app and the embedded worker.
- :mod:`embedseg_service.migrations`: the database's Alembic scripts.
"""

from importlib import metadata

try:
    __version__ = metadata.version("embedseg-service")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

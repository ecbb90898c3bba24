"""What the API and the workers share: settings, database and tables, job state machine, storage, job specs.

Nothing here imports FastAPI, Celery or torch, so a worker depends on this package and
:mod:`embedseg_service.core` only.
"""

"""EmbedSeg job workers: the Celery app, its one task, the job runner and handlers, the embedded local worker.

Importing :mod:`worker` is cheap; torch is imported only when a job runs.
"""

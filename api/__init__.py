"""EmbedSeg service: HTTP front end and the service's records.

Importing :mod:`api` is cheap: the record modules (settings, db, orm, jobs, storage, schemas)
import neither FastAPI nor torch.
"""

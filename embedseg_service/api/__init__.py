"""The HTTP front end (FastAPI): routes, uploads, previews, the dashboard and the dispatch of jobs.

The records it shares with the workers live in :mod:`embedseg_service.records`.
"""

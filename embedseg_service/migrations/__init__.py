"""Alembic migrations of the service's database (shipped inside the package; see
``embedseg_service.records.db.run_migrations``)."""

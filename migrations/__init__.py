"""Alembic migrations of the service's database (shipped inside the package; see ``api.db.run_migrations``)."""

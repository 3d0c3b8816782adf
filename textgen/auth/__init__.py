"""Who is calling: API keys (stored hashed, in a database migrated by Alembic) and the guard
that checks them on every route that needs it."""

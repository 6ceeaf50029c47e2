"""Alembic's script directory for the fleet store (``env.py``, ``versions/``)."""

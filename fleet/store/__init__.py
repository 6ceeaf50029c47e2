"""The fleet store, on SQLite (embedded, the default) or PostgreSQL.

``schema`` defines the tables once for both; ``engine`` turns a path or URL into a
SQLAlchemy engine and brings the schema up to date with the Alembic migrations in
``migrations/``; ``rows`` holds the row models every read goes through; ``store`` is the
store's API; ``lease`` chooses the one manager that runs rollouts; ``copy`` moves a
store from one database to another. Imports only ``edge.core``.
"""

from .engine import SchemaTooNew, StoreError
from .rows import DeviceRow, EventRow, IdentityRow, JobRow, Loader, Skips, load_artifact, load_job
from .store import Conflict, DatabaseError, Fence, LeaseLost, Store, Stored

__all__ = ["Conflict", "DatabaseError", "DeviceRow", "EventRow", "Fence", "IdentityRow", "JobRow", "LeaseLost",
           "Loader", "SchemaTooNew", "Skips", "Store", "StoreError", "Stored", "load_artifact", "load_job"]

"""The fleet console: a read-only JSON API (``/api/v1``), server-rendered dashboard
pages and ``/metrics``, served by ``fleet serve --http`` on any manager, leader or not.

``queries`` holds the paged and aggregated reads on the store; ``app`` the routes
(FastAPI), ``views`` and ``charts`` what the pages plot (inline SVG), ``metrics`` the
Prometheus collector, ``server`` uvicorn on its own thread. Imports ``edge.core``,
``fleet.store`` and the rollout engine's row loaders (``fleet.rollouts``,
``fleet.desired``); nothing here writes to the store.
"""

from .app import Console, create_app
from .queries import Queries
from .server import HttpError, HttpServer, HttpSettings, check

__all__ = ["Console", "HttpError", "HttpServer", "HttpSettings", "Queries", "check", "create_app"]

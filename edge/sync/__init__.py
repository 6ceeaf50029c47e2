"""Metadata to the fleet: events (checked payloads, ULIDs), the SQLite outbox, the
recorder that turns results into events, and the sync client that sends batches and
deletes them when the fleet acknowledges them.

May import ``edge.core``, ``edge.config`` and ``edge.schedule`` (for results).
"""

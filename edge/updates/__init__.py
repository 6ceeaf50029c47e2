"""Model and policy updates on the device: the agent (desired state, jobs, swap,
health window, rollback), the content-addressed model store, chunked download, the
smoke test and the health watch.

May import ``edge.core``, ``edge.config``, ``edge.inference``, ``edge.schedule`` and
``edge.sync``; never ``edge.decide`` (the daemon hands it ``apply_policy``).
"""

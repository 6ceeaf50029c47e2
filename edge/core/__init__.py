"""What both the device and the fleet stand on: the MQTT wire contract, artifact
signing, the MQTT link, SQLite helpers, errors, logging and small statistics.

Owns every topic and body of the contract, so edge and fleet cannot drift apart.
May import nothing from ``edge`` outside ``edge.core``, and never ``fleet``.
"""

"""Real-time backup: a primary daemon ships captured changes to a backup daemon.

shipper.py runs on the primary (one thread per database), receiver.py on the backup,
service.py wires both into the daemon; see docs/replication.md.
"""

from .service import Replication

__all__ = ["Replication"]

"""Shared core of the recsys serving system.

Holds what more than one component needs: the generated gRPC code
(``recsys.v1``), typed configuration (``recsys.config``), the model-version
artifact contract (``recsys.artifacts``), the Redis key schema
(``recsys.redis_keys``), user/item feature construction (``recsys.features``)
and the ``recsys`` command line (``recsys.cli``).
"""

__version__ = "0.1.0"

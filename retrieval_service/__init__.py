"""The retrieval service: pluggable candidate sources, merge/dedup/filter, gRPC serving.

Layers, innermost first:

* :mod:`retrieval_service.sources` - the candidate-source plugin interface and
  the built-in sources (Annoy similar-to-recent, Redis top lists, popular).
* :mod:`retrieval_service.registry` - finds sources through the
  ``recsys.candidate_sources`` entry-point group and validates their config.
* :mod:`retrieval_service.merge` - pure merge / filter / interleave / refill.
* :mod:`retrieval_service.engine` - one request end to end, in domain types.
* :mod:`retrieval_service.servicer` and :mod:`retrieval_service.server` - the
  gRPC edge.
"""

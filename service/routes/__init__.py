"""The HTTP routes of the recall service, one module per concern: ``health`` (liveness,
readiness, metrics), ``recall``, ``events`` and ``admin``.  Each reaches the service through
the dependencies in :mod:`service.routes.deps`; :func:`service.app.create_app` includes them.
"""

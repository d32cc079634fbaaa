"""The GPU tower worker: one room for the process that computes the user tower with torch
(the fused Triton kernel on a GPU) and answers the recall service over a Unix socket.

* :mod:`worker.tower`: the compute, free of transport: the exports held (each checked
  against eager at load), the paths (fused Triton kernel | FastTower | eager), the one
  compute thread that coalesces concurrent requests;
* :mod:`worker.server`: the process (``python -m worker.server``): the socket server around
  ``worker.tower``, signals, the parent watch, the command line;
* :mod:`worker.supervisor`: ``t2diff serve --tower-worker auto|on|off`` starts the worker as
  the serve process's child, waits for it and restarts it if it dies;
* :mod:`worker.ping`: one health question to a running worker (``--ping``, the container
  health checks).

The wire format both ends speak is a contract (``contracts.tower_wire``: frame layout,
encoding, the framed socket reader); the service's client is ``service.remote_tower``.  The
worker sits above the service in the layers (it uses that client to ping and to supervise);
the service never imports this package.

Deliberately empty: ``t2diff serve`` imports :mod:`worker.supervisor`, and the serve process
must not load torch, which only :mod:`worker.tower` and :mod:`worker.server` import.
"""

"""The nightly release: one room for the rebuild pipeline, its validation and the links.

* :mod:`release.pipeline`: ``rebuild`` (retrain? -> export -> build index -> validate ->
  promote -> prune) and ``promote_version``, driven by one :class:`release.settings`
  dataclass and raising :mod:`release.errors` (the CLI prints them and sets the exit code);
* :mod:`release.validate`: the checks a version passes before it is promoted;
* :mod:`release.links`: the versioned layout on disk, the ``current`` links, promotion,
  rollback, history and pruning;
* :mod:`release.errors`: ``ReleaseError`` and its subclasses.

Deliberately empty: ``release.links`` and ``release.errors`` are plain Python over the
contracts, and the service's ``POST /admin/rollback`` imports them (the one import the
layering contract lets the service make into this package), so importing the package must
not pull in the pipeline, FAISS or torch.
"""

"""The ``t2diff`` command line: one entry point, one sub-command per stage."""

"""radialog-node core: settings, the study registry, logging and the `radialog` CLI.

Every other top-level package (``dicom_node``, ``workers``, ``reporting``, ``api``) builds on
this one and on nothing else of each other's internals.
"""

__version__ = "0.1.0"

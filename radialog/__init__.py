"""radialog-node's kernel: what every process agrees on.

Settings, the study registry, PHI-free logging, UID checks, worker readiness (``presence``), messaging (queue and
task names, the Celery app, ``enqueue_report``, ``rerun``) and the shared vocabulary (CheXpert labels, the
model's output, the image as the model sees it). The role packages (``dicom_node``, ``reporting``, ``workers``,
``api``) build on it and talk to each other only through it (``workers`` and ``api`` may use ``reporting``);
``composition`` puts them together. The import contract in pyproject.toml (``lint-imports``) keeps it so.
"""

__version__ = "0.1.0"

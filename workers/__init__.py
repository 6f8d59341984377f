"""GPU workers: the Celery app and tasks, image preprocessing, and the model backends (``models/``)."""

"""The reporting API: FastAPI app (``create_app``), API-key auth with roles, audit log, the page.

Routes live in ``api.routes`` (thin), request/response models in ``api.schemas`` (apart from the
registry's SQLAlchemy models), shared dependencies in ``api.deps``, errors in ``api.problems``.
"""

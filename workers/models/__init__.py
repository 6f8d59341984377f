"""Model backends. Importable with torch + transformers + peft + numpy + pillow alone (no Celery, DICOM
or web imports at module level), so the GPU benchmark runs on a machine that has only those."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.models.base import ModelBackend

BACKENDS = ("radialog-v2", "radialog-v1", "xraygpt")


def load_backend(settings: Any) -> ModelBackend:
    """The configured backend, loaded once (minutes for a 7B model): call it at worker start.

    Reads ``settings.model_backend``, ``settings.device`` and the backend's files: ``model_dir`` and
    ``base_model_dir`` (radialog-v2), ``v1_dir``, ``v1_adapter``, ``v1_llm_dir`` and ``v1_biovil_file``
    (radialog-v1), ``xraygpt_vision_dir``, ``xraygpt_llm_dir`` and ``xraygpt_checkpoint`` (xraygpt). Raises
    ``ModelFileError`` (a RuntimeError) naming missing files or keys.
    """
    name = settings.model_backend
    if name == "radialog-v2":
        from workers.models.radialog_v2.backend import load_radialog_v2

        return load_radialog_v2(settings.model_dir, settings.base_model_dir, settings.device)
    if name == "radialog-v1":
        from workers.models.radialog_v1.backend import load_radialog_v1_backend

        return load_radialog_v1_backend(
            settings.v1_dir, settings.v1_adapter, settings.v1_llm_dir, settings.v1_biovil_file, settings.device
        )
    if name == "xraygpt":
        from workers.models.xraygpt.backend import load_xraygpt_backend

        return load_xraygpt_backend(
            settings.xraygpt_vision_dir, settings.xraygpt_llm_dir, settings.xraygpt_checkpoint, settings.device
        )
    raise ValueError(f"unknown model backend {name!r}; available: {', '.join(BACKENDS)}")

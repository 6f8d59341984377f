"""The serving engine: one thread owns the model and schedules prefill and decode steps.

Report jobs join a running batch between decode steps (continuous batching); dialog turns are admitted
first and, while one streams, the report batch decoding beside it is capped so the turn keeps its pace.
Keys and values live in pre-allocated pools (:mod:`workers.engine.kv_pool`); the Llama steps reuse the
loaded transformers modules with our own cache indexing (:mod:`workers.engine.decoder`).
"""

from workers.engine.engine import Engine, EngineConfig, Handle
from workers.models.base import RequestCancelled

__all__ = ["Engine", "EngineConfig", "Handle", "RequestCancelled"]

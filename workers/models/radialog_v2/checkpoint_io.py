"""Reading published checkpoint files safely: never unrestricted unpickling of files a user points us at.

``torch.load(weights_only=True)`` handles plain tensor dicts. Lightning checkpoints also pickle their
hyper-parameters (argparse.Namespace, AttributeDict, numpy scalars, paths), which the weights-only
unpickler refuses. For those we use torch's own weights-only machinery with a restricted fallback: any
class it does not know is replaced by an inert container that records its arguments and state, so no
foreign code runs and the tensors come out intact.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable, or does not hold what the loader needs (message names it)."""


class OpaqueObject(dict):
    """Stand-in for a pickled object whose class we refuse to import: its args and state kept as data."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.update(state)
        else:
            self["__state__"] = state

    def __getattr__(self, name: str) -> Any:  # Namespace-like access to recovered hyper-parameters
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


def _opaque_class(module: str, name: str) -> type[OpaqueObject]:
    return type(f"Opaque[{module}.{name}]", (OpaqueObject,), {"qualname": f"{module}.{name}"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only globals on torch's weights-only allow-list; any other class becomes inert data."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals()
        full = f"{module}.{name}"
        if full in allowed:
            return allowed[full]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque_class(module, name)


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to torch.load for the fallback (torch wraps its Unpickler)."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "radialog_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def torch_load_checked(path: Path) -> Any:
    """Load a ``.bin``/``.ckpt``/``.pt`` file: weights-only first, then the restricted fallback."""
    if not path.is_file():
        raise ModelFileError(f"missing model file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first_error:
        try:
            # weights_only=False is safe here only because the pickle module's find_class is restricted.
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
        except Exception as error:
            raise ModelFileError(
                f"cannot read {path.name} safely: {error}; weights-only load said: {str(first_error).splitlines()[0]}"
            ) from error
    except Exception as error:
        raise ModelFileError(f"cannot read {path}: {error}") from error

"""nlakit: Natural Language Autoencoders for language-model activations."""

__version__ = "0.1.0"

from .errors import NLAError
from .models import load_model

__all__ = ["ActivationStore", "NLAError", "extract", "load_corpus", "load_model", "metrics"]


def __getattr__(name):  # lazy: `import nlakit` stays fast for the CLI and helpers
    if name == "extract":
        from .activations import extract

        return extract
    if name == "ActivationStore":
        from .store import ActivationStore

        return ActivationStore
    if name == "load_corpus":
        from .corpus import load_corpus

        return load_corpus
    if name == "metrics":
        # not `from . import metrics`: that form looks the name up on this package first,
        # re-entering __getattr__ forever before the submodule is imported
        import importlib

        return importlib.import_module(".metrics", __name__)
    raise AttributeError(name)

"""nlakit: Natural Language Autoencoders for language-model activations.

The public API (every name loads its module on first use, so `import nlakit` stays fast):

  nlakit.NLA, nlakit.load_model, nlakit.extract, nlakit.load_corpus, nlakit.ActivationStore,
  nlakit.label_store, nlakit.LabelSet, nlakit.train_sft, nlakit.train_rl, nlakit.run_pipeline,
  nlakit.metrics (nlakit.eval.evaluate and nlakit.eval.audit are the modules of those stages);
  nlakit.steer (a context manager adding a vector to block K), nlakit.measure_steering and
  nlakit.SteerConfig (steering from text, in `nlakit.apps.steering`);
  the stage configs (ExtractConfig, LabelConfig, SFTConfig, RLConfig, EvalConfig, AuditConfig,
  ReportConfig) and run functions (run_extract ... run_report, see `nlakit.run.stages`).
"""

__version__ = "0.1.0"

from nlakit.errors import ConfigMismatchError, NLAError

# public name -> "module:attribute" (relative to this package)
_LAZY = {
    "NLA": "nla.facade:NLA",
    "load_model": "model.load:load_model",
    "extract": "extract.extraction:extract",
    "ExtractConfig": "extract.extraction:ExtractConfig",
    "load_corpus": "corpus.load:load_corpus",
    "ActivationStore": "extract.store:ActivationStore",
    "label_store": "labels:label_store",
    "LabelSet": "labels:LabelSet",
    "LabelConfig": "labels:LabelConfig",
    "train_sft": "train.sft:train_sft",
    "SFTConfig": "train.sft:SFTConfig",
    "train_rl": "train.rl:train_rl",
    "RLConfig": "train.rl:RLConfig",
    "EvalConfig": "eval.evaluate:EvalConfig",
    "AuditConfig": "eval.audit:AuditConfig",
    "ReportConfig": "report.render:ReportConfig",
    "run_pipeline": "run.pipeline:run_pipeline",
    "steer": "apps.steering:steer",
    "measure_steering": "apps.steering:measure_steering",
    "SteerConfig": "apps.steering:SteerConfig",
    **{name: f"run.stages:{name}" for name in (
        "run_extract", "run_label", "run_train_av", "run_train_ar", "run_train_control",
        "run_train_rl", "run_eval", "run_audit", "run_report")},
}

__all__ = ["ConfigMismatchError", "NLAError", "__version__", "metrics", *_LAZY]


def __getattr__(name):
    import importlib

    if name == "metrics":
        # not `from . import metrics`: that form looks the name up on this package first,
        # re-entering __getattr__ forever before the submodule is imported
        return importlib.import_module(".metrics", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'nlakit' has no attribute {name!r}")
    module, _, attr = _LAZY[name].partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

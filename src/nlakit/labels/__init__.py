"""Warm-start labels (the ``label`` stage): labellers, the label cache and labelled sets.

Modules: `format` (the prompt and the parser of a label), `cache` (rows, failures, the sqlite
cache of raw labels), `core` (the `Labeller` base class, the registry, labeller options and the
stage's `LabelConfig`), `labelset` (`label_store` and `LabelSet`), and one module per built-in
labeller (`local`, `context`, `openai`). The stage's `run` is `nlakit.run.stages.run_label`. Add a
labeller by subclassing `Labeller` and calling `register_labeller`, or with an entry point in
the group ``nlakit.labellers``.
"""

from nlakit.labels.cache import LabelCache, LabelFailure, LabelRow
from nlakit.labels.core import (
    DEFAULT_SPLITS,
    LabelConfig,
    Labeller,
    LabellerOptions,
    ModelLabeller,
    check_options,
    get_labeller_class,
    labeller_names,
    make_labeller,
    register_labeller,
)
from nlakit.labels.format import PROMPT_VERSION, ParsedLabel, label_messages, parse_label
from nlakit.labels.labelset import LabelSet, label_store


def __getattr__(name):  # the built-in labellers load on first use
    if name == "LocalLabeller":
        from nlakit.labels.local import LocalLabeller

        return LocalLabeller
    if name == "ContextLabeller":
        from nlakit.labels.context import ContextLabeller

        return ContextLabeller
    if name == "OpenAILabeller":
        from nlakit.labels.openai import OpenAILabeller

        return OpenAILabeller
    raise AttributeError(name)


__all__ = ["DEFAULT_SPLITS", "PROMPT_VERSION", "ContextLabeller", "LabelCache", "LabelConfig",
           "LabelFailure", "LabelRow", "LabelSet", "Labeller", "LabellerOptions",
           "LocalLabeller", "ModelLabeller", "OpenAILabeller", "ParsedLabel", "check_options",
           "get_labeller_class", "label_messages", "label_store", "labeller_names",
           "make_labeller", "parse_label", "register_labeller"]

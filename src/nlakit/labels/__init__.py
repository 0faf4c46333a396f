"""Warm-start labels (the ``label`` stage): labellers, the label cache and labelled sets.

Modules: `core` (parsing, prompt, cache, the `Labeller` base class and registry, `LabelSet`,
`label_store`), one module per built-in labeller (`local`, `context`, `openai`) and `stage`
(the stage's config and `run`). Add a labeller by subclassing `Labeller` and calling
`register_labeller`, or with an entry point in the group ``nlakit.labellers``.
"""

from .core import (
    DEFAULT_SPLITS,
    PROMPT_VERSION,
    LabelCache,
    LabelConfig,
    LabelFailure,
    Labeller,
    LabellerOptions,
    LabelRow,
    LabelSet,
    ModelLabeller,
    ParsedLabel,
    check_options,
    get_labeller_class,
    label_messages,
    label_store,
    labeller_names,
    make_labeller,
    parse_label,
    register_labeller,
)


def __getattr__(name):  # the built-in labellers load on first use
    if name == "LocalLabeller":
        from .local import LocalLabeller

        return LocalLabeller
    if name == "ContextLabeller":
        from .context import ContextLabeller

        return ContextLabeller
    if name == "OpenAILabeller":
        from .openai import OpenAILabeller

        return OpenAILabeller
    raise AttributeError(name)


__all__ = ["DEFAULT_SPLITS", "PROMPT_VERSION", "ContextLabeller", "LabelCache", "LabelConfig",
           "LabelFailure", "LabelRow", "LabelSet", "Labeller", "LabellerOptions",
           "LocalLabeller", "ModelLabeller", "OpenAILabeller", "ParsedLabel", "check_options",
           "get_labeller_class", "label_messages", "label_store", "labeller_names",
           "make_labeller", "parse_label", "register_labeller"]

"""The one exception family nlakit raises for problems a user can fix."""


class NLAError(Exception):
    """Bad input or state: the message says what was expected, what was found, and what to do."""


class ConfigMismatchError(NLAError):
    """An output directory holds data from another model, layer or configuration."""

"""The activation store and the extract stage that fills it."""

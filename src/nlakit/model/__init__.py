"""Target models: load (GGUF, HF dirs, hub ids), architecture quirks, hooks on block K,
the LM head, generation. The bottom layer: it imports nothing else of nlakit but errors/fileio."""

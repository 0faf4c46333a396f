"""The two halves of an NLA (verbalizer, reconstructor), sampling, the checkpoint layouts,
the shipped NLAs, claim checks, and the `NLA` facade (`nlakit.NLA`)."""

"""Model organisms: a model fine-tuned on chats it wrote itself under a hidden system prompt,
so that it shows the prompt's quirk without being told (the auditing game's target).

  prompts   built-in user prompts and their train / held-out split
  quirk     the hidden instruction, the words that reveal it, their rank in a term ranking
  chats     answers sampled from a model (optionally under a system prompt), resumable
  finetune  LoRA fine-tune on (user, answer) without the system prompt -> a peft adapter dir
"""

from nlakit.apps.organism.chats import read_rows, write_answers
from nlakit.apps.organism.finetune import FinetuneConfig, chat_batch, finetune_chats
from nlakit.apps.organism.prompts import USER_PROMPTS, split_prompts
from nlakit.apps.organism.quirk import OCEAN, Quirk, get_quirk, quirk_ranks, quirk_rate

__all__ = ["FinetuneConfig", "OCEAN", "Quirk", "USER_PROMPTS", "chat_batch", "finetune_chats",
           "get_quirk", "quirk_ranks", "quirk_rate", "read_rows",
           "split_prompts", "write_answers"]

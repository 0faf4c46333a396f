"""Steering from text: an explanation -> a vector (the AR) -> added to the target's block K.

The vector. ``AR(text)`` is the AR's reconstruction of an explanation a user writes;
``AR(text) - AR(contrast)`` the contrastive one (the part the two explanations do not share,
e.g. "about the ocean" minus "about nothing in particular"). Only its direction is used: it is
rescaled to ``scale x mean_norm``, mean_norm the mean block-K activation norm of the NLA's
training store (its dataset_stats, or `--acts`, or `--norm`), so scale 1 adds a vector as long
as a typical activation.

The hook. `steer` adds ``scale * vector`` to the output of decoder block K: at every position
(mode "all") or from the prompt's last token on, generated tokens included (mode
"prompt_end"), and removes itself on exit, also when the with-block raises.

The measurement (`measure_steering`, ``nlakit steer``), over neutral prompts, for the steered
vector and every control at every scale, always next to the unsteered model:

  delta_logp  per prompt, mean over the first T positions of the *unsteered* greedy
              continuation (teacher-forced, so steered and unsteered read the same context) of
              log sum_{w in W} P(w | context), W the first tokens of the concept words (with a
              leading space, lower-case and capitalised, word and its stem); steered minus
              unsteered, in nats. > 0: the concept became more likely.
  hit_rate    per prompt, the fraction of N seeded samples (max_new_tokens each) that contain
              a concept word (whole word, case-insensitive, an -s/-es plural allowed). Every
              condition draws with the same seed, so differences are not sampling luck.
  ppl_ratio   perplexity of a held-out paragraph with the vector added at every position
              (but the first in mode "prompt_end", which never steers a prompt's first token),
              divided by the unsteered perplexity: 1 = no cost, >> 1 = steering breaks the model.

CIs are 95% percentile bootstraps over prompts (`metrics.bootstrap_ci`). A verdict per scale
says whether the steered vector beats each control (paired bootstrap of the per-prompt
differences, lower bound > 0).

Controls, always on, each rescaled to the same norm: random directions (seeded Gaussian),
the mean activation direction (the store's mean unit direction with `--acts`, else the mean
block-K activation over the prompts' and paragraph's tokens), and ``AR("")`` (the AR's output
for an empty explanation: what any text gives before it says anything).
"""

from nlakit.apps.steering.bench import SteerReport, measure_steering
from nlakit.apps.steering.concepts import concept_pattern, concept_token_ids, default_concept_words
from nlakit.apps.steering.config import DEFAULT_PPL_TEXT, DEFAULT_PROMPTS, SteerConfig, SteerInputs
from nlakit.apps.steering.hook import steer
from nlakit.apps.steering.probes import prompt_mean_direction
from nlakit.apps.steering.run import run_steer, write_report
from nlakit.apps.steering.vectors import control_directions, text_vector

__all__ = ["DEFAULT_PPL_TEXT", "DEFAULT_PROMPTS", "SteerConfig", "SteerInputs", "SteerReport",
           "concept_pattern", "concept_token_ids", "control_directions",
           "default_concept_words", "measure_steering", "prompt_mean_direction",
           "run_steer", "steer", "text_vector", "write_report"]

"""The positive control of `nlakit steer`: steer along a difference of the target's *own*
block-K activations (mean over an ocean paragraph's tokens minus mean over the neutral held-out
paragraph's), measured exactly like `nlakit steer` (same prompts, seeds and controls). If this
beats the controls and the AR's vector does not, the AR is what fails, not the measurement.

    OMP_NUM_THREADS=1 python scripts/steer_reference.py [OUT]   # OUT: runs/steer-ocean-actdiff
"""

import sys

import nlakit
from nlakit.apps.steering import DEFAULT_PPL_TEXT, prompt_mean_direction, write_report
from nlakit.report.tables import format_steer

OCEAN = ("The ocean was calm that morning. Waves rolled onto the beach and the sea stretched "
         "to the horizon. Ships sailed past the harbour, and sailors watched the tide and the "
         "waves. Far out at sea, whales swam beneath the ocean surface.")


def main(out: str = "runs/steer-ocean-actdiff") -> None:
    nla = nlakit.NLA.load("smollm2-135m")
    model, tok = nla.target()
    v = (prompt_mean_direction(model, tok, nla.layer, [OCEAN])
         - prompt_mean_direction(model, tok, nla.layer, [DEFAULT_PPL_TEXT]))
    config = nlakit.SteerConfig(text="ocean paragraph minus neutral paragraph (activations)",
                                concept_words="ocean,sea,waves,ships", scale="0.25,0.5",
                                samples=8)
    report = nlakit.measure_steering(nla, config, vector=v)
    write_report(report, out)
    print(format_steer(report))
    print("seconds", report.setup["seconds"])


if __name__ == "__main__":
    main(*sys.argv[1:2])

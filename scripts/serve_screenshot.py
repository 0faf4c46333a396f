"""Write the README's screenshot of `nlakit serve` (docs/img/serve-explain.png).

It runs the browser test's own code path (`nlakit.apps.serve.browser.explain_flow`: open Explain,
submit a text, explain all tokens, click one) against a real server on 127.0.0.1 in headless
Chromium, and saves the page.

    .venv/bin/python scripts/serve_screenshot.py --nla runs/cpu-demo/nla    # after make demo
    .venv/bin/python scripts/serve_screenshot.py                           # untrained NLA

Without --nla it builds an *untrained* NLA from the embedded SmolLM2-135M (block 20): the
page then says so in its header, and its explanations mean nothing. Needs Debian's chromium
and chromium-driver (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The assignment statement evaluates the expression list and then"


def untrained_smollm_nla(layer: int = 20):
    from nlakit import load_model
    from nlakit.nla.facade import NLA
    from nlakit.nla.prompt import nice_injection_scale

    target = load_model("smollm2-135m")
    probe = NLA.from_target(target, layer, injection_scale=1.0)
    _, acts = probe.activations(TEXT)
    scale = nice_injection_scale(float(acts.norm(dim=-1).mean()))
    # no dataset statistics: fve_nrm has no honest denominator here, so the page shows cos
    return NLA.from_target(target, layer, injection_scale=scale)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nla", default=None, help="NLA directory (default: untrained SmolLM2 NLA)")
    ap.add_argument("--eval", default=None, help="eval or run directory to load as well")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "serve-explain.png"))
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--click", type=int, default=-2, help="token to click (negative: from end)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)

    import torch

    from nlakit.apps.serve import BackgroundServer, ServeLimits, create_app
    from nlakit.apps.serve.browser import chrome_driver, explain_flow

    if args.threads:
        torch.set_num_threads(args.threads)
    nla = args.nla or untrained_smollm_nla()
    app = create_app(nla, eval_dir=args.eval, limits=ServeLimits(), chunk=8)
    t0 = time.perf_counter()
    with BackgroundServer(app) as url, tempfile.TemporaryDirectory() as profile:
        driver = chrome_driver(profile, width=1280, height=860)
        try:
            res = explain_flow(driver, url, args.text, click=args.click,
                               max_new_tokens=args.max_new_tokens, timeout=1800,
                               screenshot=args.out)
        finally:
            driver.quit()
    print(f"{res.screenshot}: {res.n_tokens} tokens explained in "
          f"{time.perf_counter() - t0:.1f} s; clicked #{res.position} {res.token!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`nlakit serve`: a local web viewer of an NLA (Explain, Browse a run, Reconstruct).

    from nlakit.apps.serve import serve, create_app
    serve("runs/cpu-demo/nla", eval_dir="runs/cpu-demo")      # http://127.0.0.1:8000/

See docs/serve.md for the pages, the JSON endpoints, the limits and the security model.
Names are imported on first use, so `nlakit.apps.serve.config` (the CLI's dataclasses) does not
pull in FastAPI.
"""

import importlib

_WHERE = {"create_app": ".app", "BackgroundServer": ".server", "run_serve": ".server",
          "serve": ".server", "ServeInputs": ".config", "ServeLimits": ".limits",
          "RequestError": ".limits"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(name)

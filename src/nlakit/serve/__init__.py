"""`nlakit serve`: a local web viewer of an NLA (Explain, Browse a run, Reconstruct).

    from nlakit.serve import serve, create_app
    serve("runs/cpu-demo/nla", eval_dir="runs/cpu-demo")      # http://127.0.0.1:8000/

See docs/serve.md for the pages, the JSON endpoints, the limits and the security model.
"""

from .app import create_app
from .limits import RequestError, ServeLimits
from .server import BackgroundServer, ServeInputs, run_serve, serve

__all__ = ["BackgroundServer", "RequestError", "ServeInputs", "ServeLimits", "create_app",
           "run_serve", "serve"]

"""Running the viewer: `serve` (blocking, the CLI's entry) and `BackgroundServer` (a real
uvicorn server on a thread, for tests, scripts and notebooks)."""

from __future__ import annotations

import logging
import threading
import time

from nlakit.apps.serve.app import LOOPBACK_NAMES, create_app, is_loopback
from nlakit.apps.serve.config import ServeInputs, ServeLimits
from nlakit.errors import NLAError

log = logging.getLogger(__name__)


def allowed_hosts_for(host: str) -> list[str]:
    """Host headers to accept: loopback names, plus the bound address when it is another;
    any host when bound to all interfaces (0.0.0.0 / ::)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return LOOPBACK_NAMES + ([host] if host not in LOOPBACK_NAMES else [])


def run_serve(inputs: ServeInputs, limits: ServeLimits | None = None) -> int:
    """The `nlakit serve` subcommand: serve until interrupted; 0 on a clean stop."""
    serve(inputs.nla, av=inputs.av, ar=inputs.ar, model=inputs.model, acts=inputs.acts,
          eval_dir=inputs.eval, audit=inputs.audit, host=inputs.host, port=inputs.port,
          limits=limits, device=inputs.device, chunk=inputs.chunk)
    return 0


def serve(nla_dir=None, *, acts=None, eval_dir=None, audit=None, host: str = "127.0.0.1",
          port: int = 8000, limits: ServeLimits | None = None, device: str | None = None,
          chunk: int = 16, av=None, ar=None, model: str | None = None,
          log_level: str = "info") -> None:
    """Load the NLA once and serve the viewer until interrupted (prints the URL).

    nla_dir: an NLA directory or a loaded `NLA`; or av= and ar= directories (official layout).
    model: the target's spec when the NLA names none.

    Binds 127.0.0.1 unless `host` says otherwise; any other address logs a warning, since the
    server has no authentication and runs the model for whoever reaches it."""
    import uvicorn

    from nlakit.nla.facade import NLA

    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can run the model "
                    "(there is no authentication); use the default 127.0.0.1 to keep it local",
                    host)
    if isinstance(nla_dir, NLA):
        nla = nla_dir
    else:
        from nlakit.model.load import load_model

        target = load_model(model, device=device) if model else None
        nla = NLA.load(nla_dir, av=av, ar=ar, device=device, target=target)
    app = create_app(nla, acts=acts, eval_dir=eval_dir, audit=audit, limits=limits,
                     chunk=chunk, allowed_hosts=allowed_hosts_for(host))
    run = app.state.viewer.run
    for name, path in (("eval", run.eval_path), ("audit", run.audit_path),
                       ("acts", run.store.path if run.store is not None else None)):
        print(f"  {name}: {path if path is not None else '-'}")
    shown = f"[{host}]" if ":" in host else host
    print(f"nlakit serve: http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """A real HTTP server for `app` on a thread: ``with BackgroundServer(app) as url: ...``.
    port=0 picks a free port (the URL says which)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                     lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="nlakit-serve-http",
                                       daemon=True)
        self.url = None

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise NLAError("the viewer's HTTP server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        close = getattr(self.app.state, "close", None)
        if close:
            close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

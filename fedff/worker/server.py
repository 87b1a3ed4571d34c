"""Serving a worker: the gRPC server, health checks, credentials, signals.

`fedff worker --listen HOST:PORT` runs a `WorkerServer` until SIGTERM, SIGINT or a
SHUTDOWN command. Port 0 picks a free port; the chosen address is printed and, with
--ready-file, written to a file, which is how the local launcher learns where each
worker listens.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedff import files
from fedff.wire.rpc import SERVICE, add_worker_to_server
from fedff.wire.security import SERVER_OPTIONS, Security, TokenInterceptor, check_exposure
from fedff.worker.options import WorkerOptions
from fedff.worker.servicer import LayerWorkerServicer

log = logging.getLogger("fedff.worker")


class WorkerServer:
    """A running worker; `stop()` (or SIGTERM / SIGINT) checkpoints and frees the port."""

    def __init__(self, listen: str, options: WorkerOptions, security: Security = Security(),
                 threads: int = 0, insecure: bool = False):
        check_exposure([listen], security, insecure, "serve")
        if threads:
            torch.set_num_threads(threads)
        self._stopped = threading.Event()
        self.servicer = LayerWorkerServicer(options, security, on_shutdown=self._stop_soon)
        interceptors = ([TokenInterceptor(security.token, self.servicer.refusals.note)]
                        if security.token else [])
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  interceptors=interceptors, options=SERVER_OPTIONS)
        add_worker_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        creds = security.server_credentials()
        host = listen.rsplit(":", 1)[0]
        try:
            port = (self.server.add_secure_port(listen, creds) if creds
                    else self.server.add_insecure_port(listen))
        except RuntimeError as e:
            raise OSError(f"cannot listen on {listen} ({e}); is another worker using the "
                          f"port? pick another with --listen HOST:PORT") from e
        if port == 0:
            raise OSError(f"cannot listen on {listen}; is another worker using the port? "
                          f"pick another with --listen HOST:PORT")
        self.address = f"{host}:{port}"

    def start(self, ready_file: Path | None = None) -> "WorkerServer":
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s", self.servicer.opt.name, self.address)
        if ready_file is not None:
            files.write_text(ready_file, self.address + "\n")
        return self

    def _stop_soon(self) -> None:
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.servicer.close_session()
        self.servicer.checkpoint_now()
        self.servicer.close()
        if not self.server.stop(grace).wait(grace + 5.0):  # bounded: SIGTERM must end it
            log.warning("%s: calls still running %.0f s after stop; exiting anyway",
                        self.servicer.opt.name, grace + 5.0)

    def wait(self) -> None:
        """Serves until stopped by a signal or a SHUTDOWN command."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_soon())
        self._stopped.wait()
        self.server.wait_for_termination(timeout=10.0)

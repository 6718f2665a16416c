"""Serve questions over precomputed memories on Ray Serve (HTTP, FastAPI; docs page at /docs).

On this machine (no RAY_ADDRESS: a local Ray is started; Ctrl-C stops the service and Ray):

    python jobs/serve.py --reader runs/demo/reader --memories runs/demo/memories
    curl -s localhost:8000/v1/query -H 'content-type: application/json' \
        -d '{"doc_id": "doc-0", "questions": ["?!ab:"], "max_new_tokens": 4}'
    # a chunked document: over all its chunks at once (at most --max-chunks-per-query), or one: "chunk": 2

On a cluster (memories on S3; the service keeps running after the job returns with --detach):

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/serve.py \
        --reader s3://my-bucket/readers/kv_n16 --memories s3://my-bucket/memories/kv_n16 \
        --host 0.0.0.0 --replicas 4 --gpus-per-replica 1 --detach
    # or autoscale on load: --replicas 2 --min-replicas 1 --max-replicas 8 --target-ongoing-requests 32

Binds 127.0.0.1 unless --host says otherwise (put TLS in front of it: SECURITY.md). Serve's gRPC proxy is off;
each replica's internal gRPC port binds the node's address, not every interface. With GRADMEM_API_KEY set
(in this process's environment: it reaches the replicas only as a salted hash; on Kubernetes put it in the
pods' environment from a Secret), everything but /healthz needs `Authorization: Bearer KEY`.
For KubeRay, cluster/rayservice.yaml deploys the same application (pipelines.serve:build_app).
"""

from __future__ import annotations

import argparse
import logging
import signal
import time

import _common  # noqa: F401
from _common import connect_ray, setup_logging

from gradmem.config import add_flags, from_flags, to_dict
from pipelines.serve import ServeConfig, build_app

logger = logging.getLogger("jobs.serve")


def parse(argv: list[str] | None = None) -> tuple[ServeConfig, argparse.Namespace]:
    """Every field of ServeConfig is a flag (``cache_size`` -> ``--cache-size``; defaults live there), plus where
    this job binds HTTP and what it does after deploying."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--name", default="gradmem", help="Serve application name (default: %(default)s)")
    parser.add_argument("--detach", action="store_true", help="deploy and return (the cluster keeps serving)")
    add_flags(parser, ServeConfig, skip=("api_key_sha256",))  # derived from the key by build_app, never given
    args = parser.parse_args(argv)
    try:
        return from_flags(ServeConfig, args), args
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    setup_logging()

    from ray import serve

    connect_ray()
    # No gRPC servicers: Serve starts no gRPC proxy (it would listen on every interface); HTTP only, on --host.
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options={"grpc_servicer_functions": []})
    serve.run(build_app(to_dict(cfg)), name=args.name, route_prefix="/")
    logger.info("serving on http://%s:%d (docs at /docs)", args.host, args.port)
    if args.detach:
        return
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.delete(args.name)
    serve.shutdown()


if __name__ == "__main__":
    main()

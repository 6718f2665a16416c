"""Serve questions over precomputed memories on Ray Serve (HTTP, FastAPI; docs page at /docs).

On this machine (no RAY_ADDRESS: a local Ray is started; Ctrl-C stops the service and Ray):

    python jobs/serve.py --reader runs/demo/reader --memories runs/demo/memories
    curl -s localhost:8000/v1/query -H 'content-type: application/json' \
        -d '{"doc_id": "doc-0", "questions": ["?!ab:"], "max_new_tokens": 4}'

On a cluster (memories on S3; the service keeps running after the job returns with --detach):

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/serve.py \
        --reader s3://my-bucket/readers/kv_n16 --memories s3://my-bucket/memories/kv_n16 \
        --host 0.0.0.0 --replicas 4 --gpus-per-replica 1 --detach

Binds 127.0.0.1 unless --host says otherwise (put TLS in front of it: SECURITY.md). Serve's gRPC proxy is off;
each replica's internal gRPC port binds the node's address, not every interface. With GRADMEM_API_KEY set
(in this process's environment: it reaches the replicas only as a salted hash; on Kubernetes put it in the
pods' environment from a Secret), everything but /healthz needs `Authorization: Bearer KEY`.
For KubeRay, cluster/rayservice.yaml deploys the same application (pipelines.serve:build_app).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import _common  # noqa: F401
from _common import ROOT, setup_logging

from pipelines.serve import ServeConfig, build_app

logger = logging.getLogger("jobs.serve")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", required=True, help="reader directory (local or s3://)")
    parser.add_argument("--memories", required=True, help="memory store written by jobs/compress.py (local or s3://)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=32, help="questions per forward pass (1: no batching)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--name", default="gradmem", help="Serve application name")
    parser.add_argument("--detach", action="store_true", help="deploy and return (the cluster keeps serving)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging()
    cfg = ServeConfig(reader=args.reader, memories=args.memories, s3_endpoint=args.s3_endpoint, replicas=args.replicas,
                      cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                      max_batch_size=args.max_batch_size)
    cfg.validate()

    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}} if "RAY_ADDRESS" not in os.environ else None)
    # No gRPC servicers: Serve starts no gRPC proxy (it would listen on every interface); HTTP only, on --host.
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options={"grpc_servicer_functions": []})
    serve.run(build_app(vars(cfg)), name=args.name, route_prefix="/")
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

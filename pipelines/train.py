"""Distributed meta-training on Ray Train, with DeepSpeed (ZeRO 0, 1, 2) or plain data parallel.

Every worker runs the training loop of the in-process Trainer (``gradmem.loop.TrainLoop``: the meta-step,
optimizer and schedule, metric windows, evaluation, best reader by validation, early stopping, the checkpoint
layout of ``gradmem.train_checkpoint``). This module supplies only what is distributed:

- the engines: ``DataParallelEngine`` (identical replicas, gradients all-reduced after backward) and
  ``DeepSpeedEngine`` (``deepspeed.initialize`` with the user's DeepSpeed config: ZeRO stage, bf16/fp32,
  micro-batch size, gradient accumulation). Stage 3 is refused: ZeRO-3 gathers each parameter for a module's
  forward and releases it afterwards, but the second-order step differentiates the inner gradient again in
  the outer backward, after the parameters were released (see the docs and ``test_distributed.py``).
- each worker's data: key-value batches generated from ``(seed, rank, step, micro-step)`` (no two ranks see
  the same samples, a resumed run sees the batches it would have seen; bAbI and SQuAD are drawn from their
  train split by the same seeds), or its shard of training files through Ray Data; each rank evaluates its
  own slice of the validation split.
- ``RayReporter``: ``ray.train.report`` of the loop's events, with each rank's part of a checkpoint, persisted
  by Ray to the storage path (local or S3). The Ray-specific lines are fenced off in ``worker_loop``.

Resume needs the same number of workers and optimizer format as the run that wrote the checkpoint (ZeRO
partitions are per rank): ``--resume`` continues the run's latest, ``--resume-from`` any checkpoint directory,
an in-process Trainer's ``checkpoints/step_*`` included (one worker, plain data parallel).

The rank-0 rendezvous (torch.distributed's TCPStore, MASTER_ADDR:MASTER_PORT) listens on rank 0's node address
as Ray knows it (``NodeBoundTorchConfig``), not on every interface as Ray Train's own setup leaves it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from pydantic import Field, field_validator

from gradmem import train_checkpoint
from gradmem.config import declared
from gradmem.data import Example, collate
from gradmem.loop import LocalEngine, TrainLoop, batch_seed, build_optimizer, task_batches
from gradmem.reader import Reader
from gradmem.runtime import configure_cpu
from gradmem.train import OptimConfig, TrainConfig, build_reader, build_task, meta_step
from pipelines.storage import resolve

logger = logging.getLogger(__name__)

SUPPORTED_ZERO_STAGES = (0, 1, 2)


@declared
class DistributedConfig:
    """How to spread meta-training over Ray Train workers (frozen, validated on construction; jobs/train.py's
    flags are its fields)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    deepspeed: dict[str, Any] | None = Field(None, description="a DeepSpeed config; None: plain data parallel")
    storage: str = Field("runs/ray", description="checkpoints: local directory or s3://bucket/prefix "
                         "(jobs/train.py: the checkout's runs/ray when not given)")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (None: AWS_ENDPOINT_URL)")
    name: str = Field("gradmem", description="the run's folder under storage; the same name resumes")
    max_failures: int = Field(0, ge=0, description="Ray restarts the workers from the latest checkpoint this many "
                              "times")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker")

    @field_validator("deepspeed")
    @classmethod
    def _supported_stage(cls, ds_config: dict[str, Any] | None) -> dict[str, Any] | None:
        if ds_config is not None and zero_stage(ds_config) not in SUPPORTED_ZERO_STAGES:
            raise ValueError(
                f"ZeRO stage {zero_stage(ds_config)} is not supported for GradMem meta-training: stage 3 partitions "
                "the parameters and releases them after each module's forward, but the second-order step "
                "differentiates the inner gradient again in the outer backward, so gradients would be wrong "
                f"or fail. Use stage 0, 1 or 2 ({SUPPORTED_ZERO_STAGES}); they shard optimizer state and "
                "gradients, which is what saves memory for a reader this size."
            )
        return ds_config


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The DeepSpeed config's ZeRO stage (0 when absent); a section or stage of another type is a ValueError."""
    section = ds_config.get("zero_optimization") or {}
    if not isinstance(section, dict):
        raise ValueError(f"deepspeed zero_optimization must be an object, got {type(section).__name__}")
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, (int, str)) or not str(stage).isdecimal():
        raise ValueError(f"deepspeed zero_optimization.stage must be a whole number, got {stage!r}")
    return int(stage)


# ------------------------------------------------------------------------------------------------ engines
def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (float64, so every rank gets the same numbers)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


class DataParallelEngine(LocalEngine):
    """Plain data parallel: every rank holds the whole reader and AdamW state (the in-process Trainer's
    optimizer format); gradients are averaged after backward."""

    name = "ddp"

    def __init__(self, reader: Reader, optim: OptimConfig, rank: int, world: int):
        super().__init__(reader, optim, rank, world)
        self.micro_batch_size: int | None = None
        if world > 1:
            for p in reader.parameters():  # identical start, whatever the ranks' seeds did
                dist.broadcast(p.data, src=0)

    def reduce_gradients(self) -> None:
        if self.world == 1:
            return
        for p in self.reader.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def full_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.grad

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return all_reduce_mean(values)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-2 around the reader; the meta-step calls the reader's modules, DeepSpeed's hooks see the
    gradients of the outer backward (the inner ``autograd.grad`` accumulates no parameter gradient)."""

    name = "deepspeed"

    def __init__(self, reader: Reader, optim: OptimConfig, ds_config: dict[str, Any], rank: int, world: int):
        import deepspeed

        ds_config = dict(ds_config)
        ds_config.setdefault("gradient_clipping", optim.grad_clip)
        self.rank, self.world = rank, world
        self.micro_batch_size = int(ds_config["train_micro_batch_size_per_gpu"])
        self.accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
        ds_config["train_batch_size"] = self.micro_batch_size * self.accumulation * world
        optimizer, scheduler = build_optimizer(reader, optim)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=reader, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.reader: Reader = self.engine.module
        self.zero_stage = zero_stage(ds_config)
        self.optimizer_format = f"deepspeed_zero{self.zero_stage}"

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def reduce_gradients(self) -> None:
        pass  # DeepSpeed reduces inside engine.backward

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return all_reduce_mean(values)

    def full_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def _base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer over this rank's partition

    def optimizer_state(self) -> dict[str, Any]:
        return {"optimizer": self._base_optimizer().state_dict(), "scheduler": self.scheduler.state_dict(),
                "global_steps": self.engine.global_steps}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if hasattr(self.optimizer, "refresh_fp32_params"):
            self.optimizer.refresh_fp32_params()  # master copies from the weights just loaded into the module
        self._base_optimizer().load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.engine.global_steps = int(state["global_steps"])


# ------------------------------------------------------------------------------------------------ the loop
class RayReporter:
    """The loop's events as one ``ray.train.report`` per step (eval values prefixed ``eval_``), with this rank's
    part of a checkpoint when saving (Ray merges the ranks' directories into ``step_*`` under the run)."""

    def report(self, step: int, events: dict[str, dict[str, Any]], save) -> None:
        import ray.train

        metrics: dict[str, Any] = {"step": step, **events.get("train", {})}
        metrics.update({f"eval_{k}": v for k, v in events.get("eval", {}).items()})
        if "stop" in events:
            metrics["stop_reason"] = events["stop"]["reason"]
        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step:08d}")


def without_shm_comm() -> None:
    """Declare DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``) unavailable, before its backend starts.

    On CPU, DeepSpeed's torch backend JIT-compiles that op with the system C++ compiler the first time it starts on a
    machine (or from another virtual environment path), under a file lock in ``~/.cache/torch_extensions``: a minute
    or more of compiling in every fresh worker image, and a worker killed while it compiles leaves the lock behind,
    after which every DeepSpeed start on that machine waits on it forever. gloo reduces our gradients either way, so
    the op buys nothing here. DeepSpeed asks ``deepspeed.ops.__compatible_ops__`` whether the op may be built; only
    its comm backend reads that table (DeepSpeed 0.19), and setting it also skips the table's probe, which runs a
    compiler per op."""
    import deepspeed.ops

    table = vars(deepspeed.ops).get("__compatible_ops__")
    if table is None:
        deepspeed.ops.__compatible_ops__ = table = {}
    table["deepspeed_shm_comm"] = False


def setup(config: dict[str, Any], rank: int, world: int, device: torch.device):
    """Config, task, engine and per-worker micro-batch size: the same on every worker."""
    configure_cpu(config["threads"])
    cfg = TrainConfig.from_dict(config["train"])
    task = build_task(cfg.task) if cfg.task.name != "file" else None  # file tasks arrive through Ray Data
    reader = build_reader(cfg, task).to(device)  # same model.seed on every rank: identical initial weights
    if config["deepspeed"] is not None:
        import deepspeed

        without_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        engine = DeepSpeedEngine(reader, cfg.optim, config["deepspeed"], rank, world)
    else:
        engine = DataParallelEngine(reader, cfg.optim, rank, world)
    micro = engine.micro_batch_size or max(1, cfg.optim.batch_size // world)
    return cfg, task, engine, micro


def worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the shared training loop on a distributed engine."""
    # ---- Ray-specific: who am I, where is the checkpoint to resume from --------------------------------
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    resume_from = ray.train.get_checkpoint()  # the run's latest (a restart, --resume)
    if resume_from is None and config.get("resume_from"):  # a given checkpoint (--resume-from), local or S3
        store = resolve(config["resume_from"], config.get("s3_endpoint"))
        resume_from = ray.train.Checkpoint(store.path, filesystem=store.filesystem)
    # ------------------------------------------------------------------------------------------------
    cfg, task, engine, micro = setup(config, rank, world, device)
    if task is not None:
        batches = task_batches(task, micro, cfg.optim.seed, rank, engine.reader.tokenizer)
        eval_task = build_task(cfg.task, "validation")  # key-value: the same generator, other seeds
    else:
        shard = shard_batches(micro, engine.reader.tokenizer)
        batches, eval_task = (lambda step, micro_step: next(shard)), None
    work_dir = Path(tempfile.mkdtemp(prefix="gradmem-train-"))  # rank 0's best reader between checkpoints
    try:
        loop = TrainLoop(cfg, engine, RayReporter(), batches, eval_task, work_dir)
        if resume_from is not None:
            with local_copy(resume_from) as directory:
                loop.resume(directory)
        loop.run(cfg.optim.max_steps)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    check_replicas(engine.reader, rank)


@contextlib.contextmanager
def local_copy(checkpoint: "ray.train.Checkpoint") -> Iterator[Path]:
    """A Ray checkpoint as a local directory that belongs to this process: a local checkpoint is read in place; a
    remote one (S3) is downloaded into a temporary directory of its own, removed on exit.

    Not Ray's ``Checkpoint.as_directory``: it downloads into one directory per checkpoint shared by the processes
    of a node, and deletes it when the last reader it knows of leaves. A rank that arrives while another one
    removes it finds no directory and fails ("Checkpoint directory ... does not exist, even though it should have
    been created by another process"): seen here as a resumed two-worker run losing its first worker group.
    Nor ``pipelines.storage.local_dir``: it keeps its downloads for the process's life (right for a reader that
    every call uses, not for a checkpoint read once)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    target = Path(tempfile.mkdtemp(prefix="gradmem-checkpoint-"))
    try:
        checkpoint.to_directory(str(target))
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def shard_batches(micro: int, tokenizer):
    """Endless batches of this worker's Ray Data shard (``get_dataset_shard``: disjoint across workers)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    while True:
        empty = True
        for rows in shard.iter_batches(batch_size=micro, batch_format="pandas", drop_last=True):
            empty = False
            yield collate([Example(str(c), str(q), str(t)) for c, q, t in zip(rows["context"], rows["query"], rows["target"])],
                          tokenizer)
        if empty:
            raise ValueError(f"this worker's shard of the training files holds fewer than {micro} examples")


def read_examples(path: str, s3_endpoint: str | None = None):
    """A Ray Dataset of examples from jsonl or Parquet files (local or s3://), checked for the needed columns."""
    import ray.data

    store = resolve(path, s3_endpoint)
    parquet = path.rstrip("/").endswith(".parquet") or "parquet" in path.rsplit("/", 1)[-1]
    reader = ray.data.read_parquet if parquet else ray.data.read_json
    dataset = reader(store.path, filesystem=store.filesystem)
    missing = {"context", "query", "target"} - set(dataset.schema().names)
    if missing:
        raise ValueError(f"{path}: training files need the columns context, query, target; missing {sorted(missing)}")
    return dataset


def check_replicas(reader: Reader, rank: int) -> None:
    """Every rank must end with the same weights (data parallelism's invariant); fail loudly if not."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    prints: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, reader.fingerprint)
    if len(set(prints)) != 1:
        raise RuntimeError(f"replicas diverged: fingerprints per rank {prints}")
    if rank == 0:
        logger.info("replicas identical on %d ranks: %s", len(prints), prints[0])


def gradient_check_loop(config: dict[str, Any]) -> None:
    """One meta-step per engine in ``config["checks"]`` on every worker, in one worker group; rank 0 writes each
    engine's full (reduced) gradients to its ``out`` file, or the error that stopped it to ``out + ".error"``.

    Compare them with a single process on the union of the ranks' batches (``reference_gradients``) to check
    that an engine and ZeRO stage give correct second-order gradients. A check may be an engine expected to
    fail (``expect_error``): its error is recorded and the next check runs, so one group of workers (one
    start-up of Ray Train, torch.distributed and DeepSpeed) checks every engine."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    for check in config["checks"]:
        try:
            cfg, task, engine, micro = setup({**config, "deepspeed": check["deepspeed"]}, rank, world, device)
            batch = task.batch(micro, batch_seed(cfg.optim.seed, rank, 0, 0), engine.reader.tokenizer)
            reader = engine.reader
            loss, _ = meta_step(reader, batch, cfg.optim, reader.config.write_steps, reader.config.write_lr)
            engine.backward(loss)
            engine.reduce_gradients()
            grads = {n: engine.full_grad(p).detach().float().cpu().contiguous() for n, p in reader.named_parameters()}
        except Exception as exc:  # noqa: BLE001 - recorded for the driver, which asserts on it
            if not check.get("expect_error"):
                raise
            if rank == 0:
                Path(check["out"] + ".error").write_text(f"{type(exc).__name__}: {exc}")
            continue
        if rank == 0:
            save_file(grads, check["out"])
    ray.train.report({"checks": len(config["checks"])})


def reference_gradients(cfg: TrainConfig, world: int, micro: int) -> dict[str, torch.Tensor]:
    """Single-process gradients of the mean outer loss over the batches ``world`` ranks would draw."""
    task = build_task(cfg.task)
    reader = build_reader(cfg, task)
    for rank in range(world):
        batch = task.batch(micro, batch_seed(cfg.optim.seed, rank, 0, 0), reader.tokenizer)
        loss, _ = meta_step(reader, batch, cfg.optim, reader.config.write_steps, reader.config.write_lr)
        (loss / world).backward()
    return {n: p.grad.detach().clone() for n, p in reader.named_parameters()}


# ------------------------------------------------------------------------------------------------ rendezvous
def init_process_group_on_node(backend: str, rank: int, world: int, addr: str, port: int, timeout_s: int) -> None:
    """Join the process group through a TCPStore that rank 0 serves on ``addr`` only.

    torch's TCPStore binds its server to every interface ("::") whatever host it is given; handing it a socket
    already bound to the node's address (``master_listen_fd``) is the one way to keep the rendezvous port off
    the other interfaces. MASTER_ADDR/PORT are set as well, for anything (DeepSpeed) that reads them."""
    os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port)})
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        listener = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((addr, port))
        listener.listen(max(128, world))
        store = dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _node_bound_torch_config(backend: str):
    """A Ray Train ``TorchConfig`` whose process group rendezvous binds rank 0's node address (Ray's own
    setup, ``TorchBackend.on_start``, lets the TCPStore listen on all interfaces). Built lazily: Ray Train is
    imported on the driver only."""
    import ray
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars
    from ray.train.torch.config import _TorchBackend as TorchBackend  # private in Ray 2.60: on_start is what changes

    class NodeBoundTorchBackend(TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            addr, port = worker_group.execute_single(0, get_address_and_port)  # rank 0's node IP, as Ray knows it
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray's own on_start: LOCAL_RANK etc. (Train V2)
                worker_group.execute(_set_torch_distributed_env_vars)
            world = len(worker_group)  # positional: execute_single_async's own first parameter is named rank
            ray.get([worker_group.execute_single_async(i, init_process_group_on_node, backend_config.backend, i, world,
                                                       addr, port, backend_config.timeout_s) for i in range(world)])

    class NodeBoundTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return NodeBoundTorchBackend

    return NodeBoundTorchConfig(backend=backend)


# ------------------------------------------------------------------------------------------------ driver side
def fit(cfg: TrainConfig, dcfg: DistributedConfig, output: str | os.PathLike | None = None, resume: bool = False,
        loop=worker_loop, extra: dict[str, Any] | None = None, resume_from: str | None = None):
    """Run meta-training on the connected Ray cluster; export the final reader to ``output`` (if given): the best
    by validation when ``run.select_best`` and the run evaluated, else the last.

    A run is ``storage/name``. If it already holds checkpoints, ``resume=True`` continues from the latest
    (same step, optimizer and scheduler state); without it the run is refused rather than overwritten.
    ``resume_from`` starts the run from a checkpoint directory (local or s3://) written by this loop or by the
    in-process Trainer (same world size and optimizer format)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if output is not None:
        check_output_dir(output)  # before hours of training, not after
    store = resolve(dcfg.storage, dcfg.s3_endpoint)
    existing = store.filesystem.get_file_info(f"{store.path}/{dcfg.name}")
    if existing.type != pafs.FileType.NotFound and not resume:
        raise FileExistsError(f"run {dcfg.storage}/{dcfg.name} already exists: pass --resume to continue it, or "
                              "choose another --name")
    datasets = {"train": read_examples(cfg.task.path, dcfg.s3_endpoint)} if cfg.task.name == "file" else None
    trainer = TorchTrainer(
        loop,
        datasets=datasets,
        train_loop_config={"train": cfg.to_dict(), "deepspeed": dcfg.deepspeed, "threads": dcfg.threads_per_worker,
                           "resume_from": resume_from, "s3_endpoint": dcfg.s3_endpoint, **(extra or {})},
        torch_config=_node_bound_torch_config("nccl" if dcfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dcfg.num_workers, use_gpu=dcfg.use_gpu,
                                     resources_per_worker={"CPU": dcfg.cpus_per_worker}),
        run_config=RunConfig(
            name=dcfg.name, storage_path=store.path, storage_filesystem=store.filesystem,
            failure_config=FailureConfig(max_failures=dcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if output is not None and result.checkpoint is not None:
        export_reader(result.checkpoint, Path(output), select_best=cfg.run.select_best)
    return result


EXPORT_MARKER = ".gradmem-reader-export"  # written into every exported reader: this tool may replace it later


def check_output_dir(output: str | os.PathLike) -> Path:
    """``output`` as a path the reader export may replace: absent, an empty directory, or a previous export
    (it holds ``EXPORT_MARKER``). Anything else, a reader saved by hand included, is refused before training
    starts: ``--output`` replaces the directory, and must never delete what a user keeps there."""
    path = Path(output).expanduser().resolve()
    if not path.exists():
        return path
    if not path.is_dir():
        raise FileExistsError(f"--output {output}: a file is there; give a new directory or a previous export")
    if not any(path.iterdir()) or (path / EXPORT_MARKER).is_file():
        return path
    raise FileExistsError(f"--output {output} is a non-empty directory that is not a reader exported by this tool "
                          f"(no {EXPORT_MARKER}); it would be replaced, so it is refused: give a new or empty directory")


def export_reader(checkpoint, output: Path, select_best: bool = True) -> Path:
    """Copy a Ray checkpoint's reader (its ``best/`` when ``select_best`` and present, else ``reader/``) to a
    local directory, atomically and verified, with ``EXPORT_MARKER``. Refuses to replace a directory that is
    not a previous export (``check_output_dir``)."""
    output = check_output_dir(output)
    with local_copy(checkpoint) as directory:
        source = train_checkpoint.export_source(directory, select_best)
        return train_checkpoint.export_reader(source, output, marker=EXPORT_MARKER)

"""Distributed meta-training on Ray Train, with DeepSpeed (ZeRO 0, 1, 2) or plain data parallel.

Every worker runs the core's ``gradmem.train.meta_step`` (second order through the WRITE) inside an engine:

- ``DeepSpeedEngine``: ``deepspeed.initialize`` with the user's DeepSpeed config (ZeRO stage, bf16/fp32,
  micro-batch size, gradient accumulation). Stage 3 is refused: ZeRO-3 gathers each parameter for a module's
  forward and releases it afterwards, but the second-order step differentiates the inner gradient again in
  the outer backward, after the parameters were released (see the docs and ``test_distributed.py``).
- ``DataParallelEngine``: the plain fallback: identical replicas, gradients all-reduced after each backward.

The Ray-specific lines are fenced off in ``worker_loop``; everything else is ordinary PyTorch. Batches for the
key-value task are generated on each worker from ``(seed, rank, step, micro-step)``, so no two ranks ever see
the same samples and a resumed run sees exactly the batches it would have seen; bAbI and SQuAD batches are drawn
from their train split by the same seeds (with replacement), and each rank evaluates its own slice of the
validation split.

Checkpoints (reported with ``ray.train.report`` and persisted by Ray to the storage path, local or S3)::

    reader/                    the reader at that step (safetensors, config, tokenizer): Reader.from_pretrained
    trainer_state.json         step, world size, engine, ZeRO stage, the full config
    optimizer_rank{R}.pt       rank R's optimizer (partition) and scheduler state, loaded with weights_only=True

Nothing is unpickled on resume (DeepSpeed's own checkpoints are, so they are not used). Resume needs the same
number of workers and ZeRO stage as the run that wrote the checkpoint (optimizer partitions are per rank).

The rank-0 rendezvous (torch.distributed's TCPStore, MASTER_ADDR:MASTER_PORT) listens on rank 0's node address
as Ray knows it (``NodeBoundTorchConfig``), not on every interface as Ray Train's own setup leaves it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from pydantic import Field, field_validator

from gradmem.config import declared
from gradmem.data import Example, collate
from gradmem.reader import Reader
from gradmem.runtime import configure_cpu
from gradmem.train import TrainConfig, build_reader, build_task, evaluate, meta_step, warmup_constant
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
    storage: str = Field("runs/ray", description="checkpoints: local directory or s3://bucket/prefix")
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
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


# ------------------------------------------------------------------------------------------------ engines
class DataParallelEngine:
    """Plain data parallel: every rank holds the whole reader; gradients are averaged after backward."""

    name = "ddp"

    def __init__(self, reader: Reader, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float):
        self.reader, self.optimizer, self.scheduler, self.grad_clip = reader, optimizer, scheduler, grad_clip
        self.micro_batch_size: int | None = None
        self.accumulation = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            for p in reader.parameters():  # identical start, whatever the ranks' seeds did
                dist.broadcast(p.data, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        for p in self.reader.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    def full_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.grad

    def step(self) -> float:
        self.reduce_gradients()
        params = [p for p in self.reader.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-2 around the reader; the meta-step calls the reader's modules, DeepSpeed's hooks see the
    gradients of the outer backward (the inner ``autograd.grad`` accumulates no parameter gradient)."""

    name = "deepspeed"

    def __init__(self, reader: Reader, optimizer, scheduler, ds_config: dict[str, Any], world: int, grad_clip: float):
        import deepspeed

        ds_config = dict(ds_config)
        ds_config.setdefault("gradient_clipping", grad_clip)
        self.micro_batch_size = int(ds_config["train_micro_batch_size_per_gpu"])
        self.accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
        ds_config["train_batch_size"] = self.micro_batch_size * self.accumulation * world
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=reader, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.reader: Reader = self.engine.module
        self.stage = zero_stage(ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def reduce_gradients(self) -> None:
        pass  # DeepSpeed reduces inside engine.backward

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


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(directory: Path, engine, step: int, rank: int, world: int, cfg: TrainConfig) -> None:
    """This rank's part of a checkpoint; Ray merges the ranks' directories into one."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(engine.optimizer_state(), directory / f"optimizer_rank{rank}.pt")
    if rank == 0:
        engine.reader.save_pretrained(directory / "reader")
        state = {"step": step, "world_size": world, "engine": engine.name,
                 "zero_stage": getattr(engine, "stage", None), "config": cfg.to_dict()}
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(directory: Path, engine, rank: int, world: int) -> int:
    state = json.loads((directory / "trainer_state.json").read_text())
    if state["world_size"] != world or state["engine"] != engine.name or state["zero_stage"] != getattr(engine, "stage", None):
        raise ValueError(
            f"checkpoint {directory} was written by {state['world_size']} workers with {state['engine']} "
            f"(ZeRO {state['zero_stage']}); this run has {world} workers with {engine.name} "
            f"(ZeRO {getattr(engine, 'stage', None)}). Resume with the same layout, or start a new run from "
            "its reader/ directory (model.pretrained)."
        )
    loaded = Reader.from_pretrained(directory / "reader", trainable=True, device=engine.reader.device)
    with torch.no_grad():
        for target, source in zip(engine.reader.parameters(), loaded.parameters()):
            target.copy_(source)
    engine.load_optimizer_state(torch.load(directory / f"optimizer_rank{rank}.pt", weights_only=True))
    return int(state["step"])


# ------------------------------------------------------------------------------------------------ the loop
def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def setup(config: dict[str, Any], world: int, device: torch.device):
    """Config, task, engine and per-worker micro-batch size: the same on every worker."""
    configure_cpu(config["threads"])
    cfg = TrainConfig.from_dict(config["train"])
    task = build_task(cfg.task) if cfg.task.name != "file" else None  # file tasks arrive through Ray Data
    reader = build_reader(cfg, task).to(device)  # same model.seed on every rank: identical initial weights
    params = [p for p in reader.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.optim.warmup_steps))
    if config["deepspeed"] is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        engine = DeepSpeedEngine(reader, optimizer, scheduler, config["deepspeed"], world, cfg.optim.grad_clip)
    else:
        engine = DataParallelEngine(reader, optimizer, scheduler, cfg.optim.grad_clip)
    micro = engine.micro_batch_size or max(1, cfg.optim.batch_size // world)
    return cfg, task, engine, micro


def worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    # ---- Ray-specific: who am I, where is the checkpoint to resume from --------------------------------
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    resume_from = ray.train.get_checkpoint()
    # ------------------------------------------------------------------------------------------------
    cfg, task, engine, micro = setup(config, world, device)
    step = 0
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            step = load_checkpoint(Path(directory), engine, rank, world)
        logger.info("rank %d resumed at step %d", rank, step)

    mem, run = engine.reader.config, cfg.run
    file_batches = shard_batches(micro, engine.reader.tokenizer) if task is None else None
    eval_task = None
    engine.reader.train()
    window: list[dict[str, float]] = []
    started, start_step, timing = time.perf_counter(), step, False
    while step < cfg.optim.max_steps:
        for micro_step in range(engine.accumulation):
            if file_batches is not None:
                batch = next(file_batches).to(device)
            else:
                batch = task.batch(micro, [cfg.optim.seed, rank, step, micro_step], engine.reader.tokenizer).to(device)
            loss, metrics = meta_step(engine.reader, batch, cfg.optim, mem.write_steps, mem.write_lr)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"rank {rank}: non-finite outer loss at step {step}: {metrics}")
            engine.backward(loss)
        metrics["grad_norm"] = engine.step()
        step += 1
        if not timing:  # throughput counts from here: the first step pays for warm-up
            started, start_step, timing = time.perf_counter(), step, True
        window.append(metrics)
        report: dict[str, float] = {}
        if step % run.log_every == 0 or step == cfg.optim.max_steps:
            elapsed = time.perf_counter() - started
            report = all_reduce_mean({k: sum(m[k] for m in window) / len(window) for k in window[0]})
            if step > start_step:
                steps_per_s = (step - start_step) / max(elapsed, 1e-9)
                report["samples_per_s"] = steps_per_s * micro * engine.accumulation * world
                report["eta_s"] = (cfg.optim.max_steps - step) / steps_per_s
            window = []
        if task is not None and run.eval_every and (step % run.eval_every == 0 or step == cfg.optim.max_steps):
            if eval_task is None:  # built once: a fixed dataset's validation split (key-value: the same generator)
                eval_task = build_task(cfg.task, "validation")
            per_rank = max(1, eval_task.eval_size(run.eval_samples) // world)  # each rank: its own slice
            result = evaluate(engine.reader, eval_task, per_rank, [mem.write_steps], mem.write_lr,
                              seed=("eval", rank), batch_size=run.eval_batch_size, start=rank * per_rank)[mem.write_steps]
            report.update(all_reduce_mean({f"eval_{k}": v for k, v in result.items()}))
        save = (run.save_every and step % run.save_every == 0) or step == cfg.optim.max_steps
        if report or save:
            report["step"] = step
            if rank == 0 and report.keys() - {"step"}:
                logger.info("step %d/%d %s", step, cfg.optim.max_steps,
                            " ".join(f"{k} {v:.4g}" for k, v in sorted(report.items()) if k != "step"))
            # ---- Ray-specific: report metrics, with this rank's part of a checkpoint when saving ----------
            if save:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp), engine, step, rank, world, cfg)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"step_{step:08d}")
            else:
                ray.train.report(report)
            # ---------------------------------------------------------------------------------------------
    check_replicas(engine.reader, rank)


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
    """One meta-step on every worker; rank 0 writes the full (reduced) gradients to ``config["out"]``.

    Compare them with a single process on the union of the ranks' batches (``reference_gradients``) to
    check that an engine and ZeRO stage give correct second-order gradients."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg, task, engine, micro = setup(config, world, ray.train.torch.get_device())
    batch = task.batch(micro, [cfg.optim.seed, rank, 0, 0], engine.reader.tokenizer)
    loss, _ = meta_step(engine.reader, batch, cfg.optim, engine.reader.config.write_steps, engine.reader.config.write_lr)
    engine.backward(loss)
    engine.reduce_gradients()
    grads = {n: engine.full_grad(p).detach().float().cpu().contiguous() for n, p in engine.reader.named_parameters()}
    if rank == 0:
        save_file(grads, config["out"])
    ray.train.report({"loss": float(loss)})


def reference_gradients(cfg: TrainConfig, world: int, micro: int) -> dict[str, torch.Tensor]:
    """Single-process gradients of the mean outer loss over the batches ``world`` ranks would draw."""
    task = build_task(cfg.task)
    reader = build_reader(cfg, task)
    for rank in range(world):
        batch = task.batch(micro, [cfg.optim.seed, rank, 0, 0], reader.tokenizer)
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
        loop=worker_loop, extra: dict[str, Any] | None = None):
    """Run meta-training on the connected Ray cluster; export the final reader to ``output`` (if given).

    A run is ``storage/name``. If it already holds checkpoints, ``resume=True`` continues from the latest
    (same step, optimizer and scheduler state); without it the run is refused rather than overwritten."""
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
                           **(extra or {})},
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
        export_reader(result.checkpoint, Path(output))
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


def export_reader(checkpoint, output: Path) -> Path:
    """Copy the checkpoint's reader/ to a local directory (atomically: a temp dir, then a rename). Refuses to
    replace a directory that is not a previous export (``check_output_dir``)."""
    output = check_output_dir(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / "reader", tmp)
    Reader.from_pretrained(tmp)  # verifies the fingerprint before it is published
    (tmp / EXPORT_MARKER).write_text("exported by pipelines.train.export_reader; --output may replace this directory\n")
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    logger.info("reader exported to %s", output)
    return output

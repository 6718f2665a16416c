"""Tiny readers built from config (nothing is downloaded): one Llama, one GPT-2, both on the key-value tokenizer."""

from __future__ import annotations

import os

# Before anything imports Ray (it reads these at import): bind 127.0.0.1 only, no token auth, no usage stats.
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})

import pytest
import torch

from gradmem import MemoryConfig, Reader
from gradmem.tasks.kv import KVTask, kv_tokenizer
from gradmem.train import ModelConfig, build_backbone_config

ARCHS = ("llama", "gpt2")

# The slow tier, by rule rather than by hand: a test that uses a real service or a trained reader is slow.
SLOW_FIXTURES = {"s3", "ray_cluster", "kv_reader_dir", "smoke_run", "service", "no_context_em", "model_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The two Ray groups are the longest work units: handed out first (`make test` passes --no-loadscope-reorder,
    # so xdist keeps the collection's order), each worker starts on one; then the long modules, longest first;
    # the short ones fill in at the end (ties keep the collection's order).
    order = [*RAY_GROUPS, *(f"tests/{name}.py" for name in LONG_MODULES)]
    items.sort(key=lambda item: order.index(unit) if (unit := work_unit(item.nodeid)) in order else len(order))


# `make test` runs two pytest workers (-n 2 --dist loadscope, with the scheduler below). Every test module is one
# unit of work, so a module's fixtures are set up once, in one worker. The Ray modules make two larger units, each
# kept in order in one worker on that worker's own cluster (the cluster fixture is per session, and each worker is
# one session). Measured: the suite keeps both cores busy, so what it costs is CPU (processes starting, imports,
# training), and the split only has to balance it: training (Ray Train, DeepSpeed, `ray job submit`) with the
# store's maintenance jobs; compression with serving.
# (xdist's own `--dist loadgroup` marks a group by rewriting `item._nodeid`, which pytest 9.2 no longer reads:
# there every test was its own unit, and the served store and the engines' worker group were set up twice.
# Upstream: pytest-dev/pytest-xdist#1386.)
RAY_GROUPS = {"ray-1": ("test_distributed", "test_jobs", "test_maintain"), "ray-2": ("test_compress", "test_serve")}
# The other modules of 20 s or more, longest first (seconds per module, junit, three fresh-clone `make test` runs:
# test_write 65-81, test_prepare_model 66-73, test_train 52-62, test_baselines 33-45, test_squad 27-34,
# test_capacity 21-26). In collection order test_train and test_write came last, and one worker idled for most of a
# minute at the end while the other ran them.
LONG_MODULES = ("test_write", "test_prepare_model", "test_train", "test_baselines", "test_squad", "test_capacity")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its Ray group, or its module."""
    module = nodeid.split("::", 1)[0]
    name = module.rsplit("/", 1)[-1].removesuffix(".py")
    return next((group for group, modules in RAY_GROUPS.items() if name in modules), module)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without the plugin
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


# Tiny models gain nothing from a second OpenMP thread, and two spinning threads on a shared 2-core machine
# (Ray workers, a second process) slow every small op down by an order of magnitude.
from gradmem.runtime import configure_cpu

configure_cpu(threads=1)

# The released bAbI and SQuAD files are not in the repository: tests that read them take the directory from
# GRADMEM_DATA (as the tasks do) and are skipped, saying so, when it is not set.
DATA = os.environ.get("GRADMEM_DATA")
needs_data = pytest.mark.skipif(not DATA, reason="GRADMEM_DATA is not set: point it at the released data directory "
                                                 "(the one holding babi/ and squad/) to run the bAbI and SQuAD tests")


def make_reader(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, **memory) -> Reader:
    tokenizer = kv_tokenizer()
    torch.manual_seed(seed)
    backbone = build_backbone_config(
        ModelConfig(arch=arch, hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64, max_positions=128),
        len(tokenizer), tokenizer,
    )
    defaults = dict(num_memory=4, write_steps=2, write_lr=0.5, max_context_tokens=100, answer_stop=["|"])
    reader = Reader.from_config(backbone, tokenizer, MemoryConfig(**{**defaults, **memory}))
    return reader.to(dtype)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def reader(arch) -> Reader:
    return make_reader(arch)


@pytest.fixture
def kv_batch(reader):
    """Six examples of different lengths (1..6 pairs), so padding matters."""
    examples = [ex for n in range(1, 7) for ex in KVTask(n).examples(1, seed=n)]
    from gradmem.data import collate
    from gradmem.tasks.kv import UNSCORED

    return examples, collate(examples, reader.tokenizer, unscored=UNSCORED)


# ------------------------------------------------------------------------------------------ real services
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import s3server

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the whole session, with a bucket `gradmem-test`."""
    server = s3server.start()
    server.filesystem().create_dir("gradmem-test")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A real local Ray cluster (`ray start --head` on 127.0.0.1, with the job server) shared by the session.

    4 logical CPUs on this 2-core machine, so that readers, writers and trainers are not starved. The S3
    credentials are in its environment, as a cluster's nodes would have them. Ray's Prometheus endpoint (GradMem's
    metrics among Ray's) is at ``metrics``."""
    import ray

    from gradmem.runtime import free_ports

    dashboard, gcs, metrics, agent, client = free_ports(5)  # distinct: one at a time, two could get one port
    # RAY_ADDRESS: the cluster's own processes (Ray Train's PlacementGroupCleaner among them) look their cluster
    # up by address; with the other pytest worker's cluster on this machine, "auto" finds two and they fail
    env = {**os.environ, **s3.env, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": f"127.0.0.1:{gcs}",
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's own metrics interval (10 s), not 1 s: every worker process exports its metrics at that interval. One
    # run each of test_compress.py alone: 248 s of machine CPU and 192 s of wall at 1 s, 233 s and 181 s at 10 s
    # (its metrics test waits for the next report, within its 90 s)
    os.environ.update(s3.env)
    temp_dir = tempfile.mkdtemp(prefix="gm-ray-")  # this cluster's own: teardown stops it and nothing else
    # the job agent and the client server on free ports, not Ray's fixed 52365 and 10001: the other pytest worker's
    # cluster (or another checkout's tests) may hold them
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=4",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                    f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                    "--node-ip-address=127.0.0.1",
                    f"--metrics-export-port={metrics}", "--disable-usage-stats", f"--temp-dir={temp_dir}"], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # daemons inherit these: no pipes
    address = f"127.0.0.1:{gcs}"
    ray.init(address=address)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
           "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    ray.shutdown()
    _stop_cluster(temp_dir, address)


def _stop_cluster(temp_dir: str, address: str) -> None:
    """Stop the processes of the cluster that uses ``temp_dir`` or its GCS ``address`` (the client server names
    only the latter); ``ray stop`` would stop every cluster on the machine."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part or part.endswith(f"={address}") for part in proc.info["cmdline"] or []):
            procs.append(proc)
            procs.extend(proc.children(recursive=True))
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # the session is over: no graceful shutdown to wait for
    for proc in alive:
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory both pytest workers of one run see (the run's base temp), for what a session builds once."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def kv_reader_dir(tmp_path_factory) -> Path:
    """A tiny Llama reader trained in-process on 1-pair key-value retrieval (jobs/configs/kv_tiny.yaml, 200 steps,
    ~15 s): it answers from memory, so pipeline tests can check answers, not just shapes. Trained once per run:
    the first worker to ask trains it under a file lock, the other waits and reads it (tests never write into it)."""
    from filelock import FileLock

    from gradmem.config import override
    from gradmem.train import TrainConfig, Trainer

    out = shared_dir(tmp_path_factory, "kv_reader")
    with FileLock(f"{out}.lock"):
        if not (out / "done").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died half-way
            cfg = TrainConfig.from_yaml(str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "kv_tiny.yaml"))
            cfg = override(cfg, {"optim.max_steps": 200, "run.eval_every": 0, "run.save_every": 0,
                                 "memory.max_context_tokens": 100})  # so that chunking and over-long inputs are cheap
            Trainer(cfg, out).fit()
            (out / "done").touch()
    return out / "reader"


def load_job(name: str):
    """``jobs/<name>.py`` as a module, so its main() runs in this process (no second torch import). Benchmarks are
    a package: tests import ``benchmarks.<name>`` and call its main()."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    if str(root / "jobs") not in sys.path:
        sys.path.insert(0, str(root / "jobs"))
    spec = importlib.util.spec_from_file_location(f"{name}_job", root / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of metric sample ``name`` over the series carrying ``labels``, read over HTTP from a Prometheus
    endpoint (0 while none exists: Ray exports a counter only once it moved)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(_same(sample.labels.get(k), v) for k, v in labels.items()))


def _same(label: str | None, wanted: str) -> bool:
    """Label values compare as text, numbers (a bucket's ``le``: "2" or "2.0") as numbers."""
    if label == wanted:
        return True
    try:
        return label is not None and float(label) == float(wanted)
    except ValueError:
        return False


def unmoved(before: dict[str, float], after: dict[str, float], wanted: dict[str, float]) -> dict:
    """The counts that did not move by at least what ``wanted`` says: {name: (before, after, wanted)}."""
    return {k: (before[k], after[k], n) for k, n in wanted.items() if after[k] - before[k] < n}


def exported_names(url: str, prefix: str = "ray_gradmem_") -> list[str]:
    """The series of ours a Prometheus endpoint shows (for failure messages)."""
    import requests

    return sorted({line for line in requests.get(url, timeout=10).text.splitlines() if line.startswith(prefix)})


def wait_for(condition, timeout: float = 90, every: float = 2.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass (Ray exports metrics every few seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def markdown_rows(text: str, header: str) -> dict[str, dict[str, str]]:
    """The first markdown table whose header line starts with ``header``: {first cell: {column: cell}}. Tests
    check a report's figures against its JSON with it, rather than pinning the markdown."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells))
    return rows

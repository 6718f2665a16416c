"""The GPU bench's parts that run anywhere: its CPU smoke (the same code on tiny shapes) and the offline wheel set it
installs from on a machine with no package index (benchmarks/offline_wheels.py), on hand-made wheels: no network."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import zipfile

import pytest

from benchmarks import gpu_bench, offline_wheels


def test_the_smoke_run_writes_every_reader_cell_with_its_flops(tmp_path):
    assert gpu_bench.main(["--output", str(tmp_path), "--smoke", "--readers", "kv", "--repeats", "2"]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    (kv,) = bench["results"]
    assert kv["reader"] == "kv" and kv["batch"] == 8
    for key in ("meta_step_s", "write_s", "meta_step_tflop", "write_tflop", "loop_step_s"):
        assert kv[key] > 0, key
    assert kv["meta_step_tflop"] > kv["write_tflop"]  # the second-order step does more than a first-order write
    assert "| kv |" in (tmp_path / "bench.md").read_text() and "Training loop (kv" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_an_unknown_reader_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--output", str(tmp_path), "--readers", "kv,gpt5"])
    assert "gpt5" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_the_requirements_expand_the_project_s_own_extras():
    reqs = offline_wheels.requirements("ray")  # ray = gradmem[pipelines] + Ray Train + DeepSpeed
    assert any(r.startswith("ray[data,serve]") for r in reqs) and any(r.startswith("deepspeed") for r in reqs)
    assert any(r.startswith("transformers") for r in reqs) and "pytest" in reqs
    assert not any(r.startswith("gradmem") for r in reqs)
    assert not any(r.startswith("deepspeed") for r in offline_wheels.requirements("pipelines"))


def test_names_are_read_from_a_freeze_or_a_list(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("# the machine's packages\nTorch==2.11.0\nnumpy, pyarrow  Typing_Extensions\nray[serve]>=2\n\n")
    assert offline_wheels.read_names(have) == {"torch", "numpy", "pyarrow", "typing-extensions", "ray"}


def test_only_models_no_kept_code_imports_are_dropped():
    members = {
        "transformers/__init__.py": b"from .models.bert import BertConfig  # names models.bert",
        "transformers/models/auto/tokenization_auto.py": b"from ..encoder_decoder import EncoderDecoderConfig\n",
        "transformers/models/encoder_decoder/modeling.py": b"from ..t5 import T5Model\n",
        "transformers/models/t5/modeling.py": b"x = 1\n",
        "transformers/models/llama/modeling.py": b"from ...utils import logging\n",
        "transformers/models/bert/modeling.py": b"",
        "transformers/models/whisper/modeling.py": b"from ..gpt2 import GPT2Model\n",  # not kept: names nothing kept
        "transformers/models/gpt2/modeling.py": b"",
        "transformers/models/mamba/modeling.py": b"",
    }
    drop = offline_wheels.unused_models(members, keep={"auto", "llama"})
    dropped = {name.split("/")[2] for name in members if drop.search(name)}
    assert dropped == {"whisper", "gpt2", "mamba"}  # encoder_decoder and t5 by the chain from auto; bert from the root
    assert not drop.search("transformers/models/__init__.py")


def test_slimming_a_wheel_drops_the_members_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/jars/big.jar": b"\0" * 100_000, "pkg/app.js.map": b"{}"}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    saved = offline_wheels.slim(wheel, lambda members: offline_wheels.re.compile(r"^pkg/jars/|\.js\.map$"))
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert z.read("pkg/__init__.py") == b"x = 1\n"
        rows = list(csv.reader(io.StringIO(z.read("pkg-1.0.dist-info/RECORD").decode())))
    assert [row[0] for row in rows] == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]


def test_the_check_after_an_offline_install_names_each_requirement_not_met(tmp_path):
    """``--no-deps`` installs check nothing; ``--check`` does, against what this Python imports."""
    import packaging

    def wheel(name: str, *requires: str):
        with zipfile.ZipFile(tmp_path / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n" +
                       "".join(f"Requires-Dist: {r}\n" for r in requires))

    wheel("fine", "packaging>=1", 'no-such-package-a; extra == "never"', "py-spy>=999")  # met, unasked, left out
    wheel("needy", "packaging>=999", "no-such-package-b")
    problems = offline_wheels.unmet(["packaging>=1"], sorted(tmp_path.glob("*.whl")))
    assert problems == [f"needy needs packaging>=999: {packaging.__version__} is installed",
                        "needy needs no-such-package-b: not installed"]
    assert offline_wheels.main(["--check", str(tmp_path)]) == 1
    # an extra the project asks of an installed package: that extra's requirements are checked too
    if importlib.util.find_spec("socks") is None:  # PySocks, requests[socks]'s one requirement, is not pinned here
        assert offline_wheels.unmet(["requests[socks]>=2"], []) == [
            'requests[socks] needs PySocks!=1.5.7,>=1.5.6; extra == "socks": not installed']

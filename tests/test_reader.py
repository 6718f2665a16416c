"""The public API: strings in, strings out; checkpoints; fingerprints; clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradmem import NonFiniteWriteError, Reader, WriteSetting
from gradmem.tasks.kv import KVTask
from conftest import make_reader


def _examples(n=5):
    return [ex for k in range(1, n + 1) for ex in KVTask(k).examples(1, seed=100 + k)]


def test_write_returns_memories_and_stats(reader):
    exs = _examples()
    mem = reader.write([e.context for e in exs], steps=3)
    assert mem.tensor.shape == (5, reader.num_memory, reader.d_model)
    assert mem.stats.losses.shape == (5, 4) and mem.stats.accuracy.shape == (5,)
    assert mem.stats.n_tokens.tolist() == [len(e.context) for e in exs]
    assert mem.fingerprint == reader.fingerprint and mem.setting == WriteSetting(3, reader.config.write_lr)
    assert len(mem[1:3]) == 2 and torch.equal(mem[2].tensor[0], mem.tensor[2])
    # in batches of two, longest first: three length buckets, reordered, each copied back to its inputs' places
    exs = exs[::-1]
    in_twos = reader.write([e.context for e in exs], steps=3, batch_size=2)
    for i, e in enumerate(exs):
        alone = reader.write([e.context], steps=3)
        assert torch.allclose(in_twos.tensor[i], alone.tensor[0], atol=1e-5), i
        assert torch.allclose(in_twos.stats.losses[i], alone.stats.losses[0], atol=1e-5), i
        assert torch.allclose(in_twos.stats.accuracy[i], alone.stats.accuracy[0]), i


def test_answers_batched_equal_answers_alone(reader):
    exs = _examples()
    mem = reader.write([e.context for e in exs])
    together = reader.answer(mem, [e.query for e in exs], max_new_tokens=6)
    alone = [reader.answer(mem[i], [e.query], max_new_tokens=6)[0] for i, e in enumerate(exs)]
    assert together == alone
    assert all(isinstance(a, str) and "|" not in a for a in together)


def test_checkpoint_round_trip(reader, tmp_path):
    exs = _examples()
    mem = reader.write([e.context for e in exs])
    answers = reader.answer(mem, [e.query for e in exs], max_new_tokens=6)
    reader.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "gradmem.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    section = json.loads((tmp_path / "config.json").read_text())["gradmem"]
    assert section["fingerprint"] == reader.fingerprint and section["memory"]["num_memory"] == reader.num_memory

    loaded = Reader.from_pretrained(tmp_path)
    assert loaded.fingerprint == reader.fingerprint
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    mem2 = loaded.write([e.context for e in exs])
    assert torch.equal(mem2.tensor, mem.tensor)
    assert loaded.answer(mem2, [e.query for e in exs], max_new_tokens=6) == answers
    assert loaded.answer(mem, [e.query for e in exs], max_new_tokens=6) == answers  # memories travel


def test_fingerprint_tracks_weights_and_tampering_is_caught(reader, tmp_path):
    before = reader.fingerprint
    with torch.no_grad():
        reader.memory[0, 0] += 1.0
    assert reader.fingerprint != before
    reader.save_pretrained(tmp_path)
    extra = load_file(str(tmp_path / "gradmem.safetensors"))
    extra["memory"][0, 0] += 1.0
    save_file(extra, str(tmp_path / "gradmem.safetensors"))
    with pytest.raises(ValueError, match="fingerprint"):
        Reader.from_pretrained(tmp_path)


def test_memories_from_another_reader_are_refused(reader, arch):
    other = make_reader(arch, seed=1)
    mem = other.write(["!ab:cd!|"])
    with pytest.raises(ValueError, match="written by reader"):
        reader.answer(mem, ["?!ab:"])


def test_plain_model_directory_is_not_a_reader(reader, tmp_path):
    reader.lm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="plain language model"):
        Reader.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Reader.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("bad, message", [
    (["!ab:cd!|", ""], "context 1 is empty"),
    (["   "], "context 0 is empty"),
    (["!ab:cd!|", None], "context 1 is a NoneType"),
    ("!ab:cd!|", "list of strings"),
    (["!ab:cd!|", "a" * 101], r"context 1 has 101 tokens, over this reader's maximum of 100"),
])
def test_bad_contexts_raise_clear_errors(reader, bad, message):
    with pytest.raises(ValueError, match=message):
        reader.write(bad)


def test_bad_questions_raise_clear_errors(reader):
    mem = reader.write(["!ab:cd!|", "!ef:gh!|"])
    with pytest.raises(ValueError, match="one question per memory"):
        reader.answer(mem, ["?!ab:"])
    with pytest.raises(ValueError, match="question 1 is too long"):
        reader.answer(mem, ["?!ab:", "a" * 120], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        reader.answer(mem, ["?!ab:", "?!ef:"], max_new_tokens=0)


def test_nan_write_is_reported_with_every_memory_kept(reader):
    """A NaN in one sample (here a corrupted embedding row for 'z') flags that sample only; none is lost."""
    with torch.no_grad():
        reader.lm.get_input_embeddings().weight[reader.tokenizer.convert_tokens_to_ids("z")] = float("nan")
    with pytest.raises(NonFiniteWriteError) as err:
        reader.write(["!ab:cd!|", "!zz:gh!|", "!ef:gh!|"])
    assert err.value.bad == [1] and len(err.value.memories) == 3
    assert torch.isfinite(err.value.memories.tensor[[0, 2]]).all()
    with pytest.raises(ValueError, match="NaN/inf"):
        reader.answer(err.value.memories, ["?!ab:", "?!zz:", "?!ef:"])


def test_write_tokens_is_write_on_token_ids_and_reconstruct_decodes_freely(reader):
    texts = ["!ab:cd!|", "!ef:gh!!ij:kl!|", "!mn:op!|"]
    ids = reader.encode_contexts(texts)
    mem = reader.write(texts)
    torch.testing.assert_close(reader.write_tokens(ids).tensor, mem.tensor)
    with pytest.raises(ValueError, match="has no tokens"):
        reader.write_tokens([ids[0], []])
    with pytest.raises(TypeError, match="must be a WriteSetting"):
        reader.write_tokens(ids, 2)  # the old positional steps
    batched = reader.reconstruct(mem, ids)
    alone = torch.cat([reader.reconstruct(mem[i], [ids[i]]) for i in range(len(ids))])
    torch.testing.assert_close(batched, alone)
    # by hand, for the second context: greedy tokens from [M; generated so far] through the write head
    memory, target, out = mem.tensor[1:2], ids[1], []
    with torch.no_grad():
        for _ in target:
            hidden = reader.hidden(reader.project(memory), torch.tensor([out], dtype=torch.long).reshape(1, -1))  # (1, m + t, d)
            out.append(int(reader.write_head(hidden[:, -1]).argmax(-1)))
    assert batched[1].item() == pytest.approx(sum(a == b for a, b in zip(out, target)) / len(target))


def test_bf16_written_memories_answer_as_the_float32_ones_do(kv_reader_dir):
    """On a trained reader, memories written in bf16 arithmetic (``precision="bfloat16"``, what
    ``jobs/compress.py --precision bfloat16`` runs) answer held-out questions as well as the float32 ones."""
    from gradmem.memory import WRITE_PRECISIONS
    from gradmem.tasks.kv import exact_match

    reader = Reader.from_pretrained(kv_reader_dir)
    exs = KVTask(1).examples(64, seed=[41, 1])
    em = {}
    for precision in WRITE_PRECISIONS:
        memories = reader.write([e.context for e in exs], precision=precision)
        answers = reader.answer(memories, [e.query for e in exs], max_new_tokens=4)
        em[precision] = sum(exact_match(a, e.target) for a, e in zip(answers, exs)) / len(exs)
    assert em["float32"] > 0.8 and em["bfloat16"] >= em["float32"] - 2 / 64, em


def test_a_bf16_write_on_cpu_takes_the_eager_attention_path_and_computes_what_sdpa_does():
    """``write_attention``: a write that names no path takes eager attention for bf16 on CPU (the faster there) and
    SDPA otherwise; the two paths write the same memories up to bf16 rounding, and float32 ones to float32's."""
    from gradmem.attention import write_attention

    assert [write_attention(d, p) for d in ("cpu", "cuda") for p in ("float32", "bfloat16")] == [
        "sdpa", "eager", "sdpa", "sdpa"]
    reader = make_reader("llama").freeze()
    contexts = [e.context for e in KVTask(3).examples(8, seed=5)]
    for precision, tolerance in (("float32", 1e-5), ("bfloat16", 2e-2)):
        default = reader.write(contexts, precision=precision)
        chosen = reader.write(contexts, precision=precision, attention=write_attention("cpu", precision))
        other = reader.write(contexts, precision=precision, attention="eager" if precision == "float32" else "sdpa")
        assert torch.equal(default.tensor, chosen.tensor), precision
        scale = float(default.tensor.abs().max())
        assert (default.tensor - other.tensor).abs().max() <= tolerance * scale, precision
        assert torch.allclose(default.stats.losses, other.stats.losses, rtol=tolerance, atol=tolerance), precision


def test_a_reader_directory_whose_config_is_not_a_json_object_is_one_clear_error(tmp_path):
    make_reader("llama").save_pretrained(tmp_path / "reader")
    for content, message in ((b"[1, 2]", "not a JSON object"), (b'"text"', "not a JSON object"),
                             (b"{not json", "not a JSON document"), (b"\xff\xfe", "not a JSON document")):
        (tmp_path / "reader" / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            Reader.from_pretrained(tmp_path / "reader")


def test_a_reader_directory_s_own_code_is_never_run(tmp_path, monkeypatch):
    """A reader directory whose config.json names code of its own (``auto_map``): transformers would ask on stdin
    whether to run it, and a "y" (here: every prompt answered yes) would run it before any fingerprint check.
    Every load says trust_remote_code=False: the code is never imported, whatever the answer."""
    from gradmem.reader import ReaderSpec

    make_reader("llama").save_pretrained(tmp_path / "reader")
    marker = tmp_path / "ran"
    (tmp_path / "reader" / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                   "from transformers import LlamaConfig as EvilConfig\n"
                                                   "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((tmp_path / "reader" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.EvilConfig", "AutoModelForCausalLM": "custom.EvilModel"}
    config["model_type"] = "evil_arch"  # no class of transformers' own: it would have to ask
    (tmp_path / "reader" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")
    for load in (lambda: ReaderSpec.from_dir(str(tmp_path / "reader")), lambda: Reader.from_pretrained(tmp_path / "reader")):
        try:
            load()
        except ValueError:
            pass  # refusing is fine too (the edited config no longer matches the fingerprint); running code is not
    assert not marker.exists()

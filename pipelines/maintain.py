"""Repair and upgrade an existing memory store (jobs/maintain.py): the compression pipeline again, on the same
input, with a plan (repair) or another reader (upgrade). Resumable, idempotent and lossless as compression is,
for the same reasons (content-addressed immutable parts, whatever the store holds is skipped).

Repair: rewrite the memories of one reader whose recorded reconstruction accuracy (``recon_accuracy``, the
teacher-forced accuracy every record carries) is under ``below``, with another write setting (more steps, or an
adaptive target), from the original text. The store keeps no text: the job reads the input the compression read,
selects the weak (doc_id, chunk) from the store (``plan_repair``: each reader's current memory, see
``gradmem.store.current_memories``) and writes only those chunks, as the next ``revision`` of the same (doc_id,
chunk). The repaired memory is one new part: once it is visible it is current and the weak one is not, so a
reader never sees the document with no memory or with two. The text is checked to be the memory's own (the
memory_id is a content address over the tokens and the old setting): a changed text is reported ``stale`` and
its memory left as it is. Skipped, so that a rerun changes nothing: memories at or above the threshold, and
memories already written with the repair's setting (the repaired ones, even if still under the threshold).
Repair writes no error rows (the compression run accounted for every input) and no memories of documents it
does not repair. Its report goes into the manifest (``last_repair``) beside the compression's counts.

Upgrade: compress the same input with a newly trained reader into the same store (``compress(mode="upgrade")``):
only what that reader does not yet have is written, a killed run's rerun writes the rest, and the store then
holds both readers' memories (the manifest's ``readers`` says which is which). Its last step, only when the new
reader's memories account for every input (the manifest's ``complete``), writes the served-reader pointer
(``MemoryStore.write_served``) in one atomic replacement; services switch when they see it
(pipelines/served.py). Documents written online by the old reader (not in the input) are not upgraded: the
service answers 409 for them, naming the reader that wrote them. Error rows are keyed by input, not by reader, so
an input the old reader recorded as an error (``non_finite`` included) stays that error for the new reader and is
not retried.

Not supported: two maintenance or compression jobs on one store at once (as for compression).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow.compute as pc
from pydantic import Field

from gradmem.config import declared
from gradmem import records
from gradmem.memory import WriteSetting
from gradmem.store import MemoryStore, current_memories, describe_readers
from pipelines.compress import CompressConfig, RepairTarget, compress, open_run, this_run, write_pass
from pipelines.storage import resolve

logger = logging.getLogger(__name__)

EXAMPLES = 10  # doc ids a report names of each kind


@declared
class RepairConfig:
    """What a repair rewrites (its write setting and everything else are CompressConfig's fields)."""

    below: float = Field(gt=0, le=1, description="rewrite memories whose recorded reconstruction accuracy "
                         "(teacher-forced) is under this")


def plan_repair(store: MemoryStore, fingerprint: str, below: float,
                setting: WriteSetting) -> tuple[dict[tuple[str, int], RepairTarget], int]:
    """The weak memories of reader ``fingerprint`` to rewrite with ``setting``: (doc_id, chunk) ->
    ``RepairTarget``, and how many weak ones are skipped because they already carry that setting (repaired
    before, or written with it in the first place)."""
    table = store.read_memories(["doc_id", "chunk", "memory_id", "recon_accuracy", *records.SETTING_COLUMNS])
    if table is None:
        return {}, 0
    table = table.filter(pc.equal(table.column("fingerprint"), fingerprint))
    current, _ = current_memories(table)
    plan: dict[tuple[str, int], RepairTarget] = {}
    already = 0
    for row in current.to_pylist():
        if row["recon_accuracy"] is None or row["recon_accuracy"] >= below:  # null: nothing says it is weak
            continue
        theirs = records.write_setting(row)
        if theirs == setting:
            already += 1
            continue
        plan[(row["doc_id"], row["chunk"])] = RepairTarget(row["memory_id"], theirs, revision=row["revision"])
    return plan, already


def repair(cfg: CompressConfig, rcfg: RepairConfig) -> dict[str, Any]:
    """Rewrite the weak memories of ``cfg.reader`` in ``cfg.output`` from ``cfg.input`` with ``cfg``'s write
    setting; returns (and records in the manifest as ``last_repair``) the report. ``complete``: every planned
    memory was rewritten, found stale, or has no document in the input (``not_in_input``)."""
    started = time.time()
    if cfg.steps is None and cfg.target_accuracy is None:
        raise ValueError("a repair needs its write setting: give --steps (more than the weak memories got) or "
                         "--target-accuracy")
    run = open_run(cfg, mode="repair")
    store, fingerprint = run.store, run.spec.fingerprint
    _check_repairable(store, fingerprint, cfg)
    plan, already = plan_repair(store, fingerprint, rcfg.below, run.setting)
    if plan and not cfg.chunk and any(chunk > 0 for _, chunk in plan):
        raise ValueError("some memories to repair are chunks of a chunked document: pass --chunk, as the compression "
                         "did (without it their texts are too long to write)")
    logger.info("repair: %d memories of reader %s under %.3f to rewrite with %s; %d already carry that setting",
                len(plan), fingerprint, rcfg.below, run.setting.describe(), already)
    done = write_pass(run, plan) if plan else None  # nothing weak: no pass, nothing written
    left, _ = plan_repair(store, fingerprint, rcfg.below, run.setting)
    stale = done.stale if done is not None else []
    # a weak memory whose document the input does not hold (an online write, a document since removed): nothing
    # to rewrite it from, so reported, never counted as remaining (a rerun could not help)
    given = set(done.inputs.column("doc_id").to_pylist()) if done is not None else set()
    absent = sorted(k for k in left if k[0] not in given) if done is not None else []
    remaining = sorted(set(left) - set(stale) - set(absent))
    still_weak = _still_weak(store, fingerprint, rcfg.below)
    report = {
        "reader_fingerprint": fingerprint, "reader": cfg.reader, "input": cfg.input, "below": rcfg.below,
        **records.setting_columns(run.setting),
        "planned": len(plan), "already_repaired": already, "rewritten": done.done["memories"] if done else 0,
        "stale": len(stale), "stale_examples": [list(k) for k in stale[:EXAMPLES]],
        "not_in_input": len(absent), "not_in_input_examples": [list(k) for k in absent[:EXAMPLES]],
        "remaining": len(remaining), "still_weak": still_weak, "complete": not remaining,
        "this_run": this_run(done.done, done.seconds, started) if done else {"wall_s": round(time.time() - started, 3)},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if stale:
        logger.warning("%d memories were left as they are: the input's text is not the one they were written from, "
                       "e.g. %s", len(stale), stale[:5])
    if absent:
        logger.warning("%d weak memories were left as they are: the input holds no document of theirs (an online "
                       "write, or a document removed from the input), e.g. %s", len(absent), absent[:5])
    if done is not None:  # a rerun that found nothing to do leaves the store, the manifest included, as it was
        store.write_manifest({**(store.manifest() or {}), "readers": describe_readers(store), "last_repair": report})
    logger.info("repair done: %d planned, %d rewritten, %d stale, %d remaining; %d memories still under %.3f",
                len(plan), report["rewritten"], len(stale), len(remaining), still_weak, rcfg.below)
    return report


def _check_repairable(store: MemoryStore, fingerprint: str, cfg: CompressConfig) -> None:
    """Clear errors, before any work, for a reader that wrote nothing here and for a chunked store repaired
    without --chunk (its long texts would not become memories)."""
    if fingerprint not in set(store.fingerprints("memories").values()):
        raise ValueError(f"the store {cfg.output} holds no memories of reader {fingerprint}: a repair rewrites "
                         "memories with the reader that wrote them (--reader)")
    if (store.manifest() or {}).get("chunked") and not cfg.chunk:
        raise ValueError(f"the store {cfg.output} was compressed with --chunk: pass it to the repair too")


def _still_weak(store: MemoryStore, fingerprint: str, below: float) -> int:
    """Current memories of the reader under the threshold after the repair (more steps do not always reach it)."""
    table = store.read_memories(["doc_id", "chunk", "memory_id", "recon_accuracy"])
    if table is None:
        return 0
    current, _ = current_memories(table)
    return sum(1 for r in current.select(["fingerprint", "recon_accuracy"]).to_pylist()  # null: nothing says weak
               if r["fingerprint"] == fingerprint and r["recon_accuracy"] is not None and r["recon_accuracy"] < below)


def upgrade(cfg: CompressConfig) -> dict[str, Any]:
    """Compress ``cfg.input`` with the new reader ``cfg.reader`` into the existing store ``cfg.output`` (only what
    it lacks), then, when that reader's set is complete, point the services at it. Returns the manifest."""
    manifest = compress(cfg, mode="upgrade")
    if not manifest["complete"]:
        logger.warning("upgrade: reader %s does not yet account for every input; the served reader is unchanged "
                       "(rerun the same command)", manifest["reader_fingerprint"])
        return manifest
    where = resolve(cfg.output, cfg.s3_endpoint)
    store = MemoryStore(where.filesystem, where.path)
    pointer = {"reader": _location(cfg.reader), "fingerprint": manifest["reader_fingerprint"]}
    if {k: (store.served() or {}).get(k) for k in pointer} != pointer:  # a rerun leaves the pointer as it is
        store.write_served(**pointer)  # the switch: one atomic replacement
    manifest = {**manifest, "served": store.served()}
    store.write_manifest(manifest)
    logger.info("upgrade: reader %s is complete and now the served reader of %s", manifest["reader_fingerprint"],
                cfg.output)
    return manifest


def _location(uri: str) -> str:
    """The reader's location as services elsewhere can read it: s3:// as given, a local path made absolute."""
    return uri if "://" in uri else os.path.abspath(uri)

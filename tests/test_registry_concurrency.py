"""The registry under concurrency, on local disk and on a moto S3 server over real HTTP.

Publishers and alias movers run in parallel processes (spawn) against one registry; then
every version must be complete and belong to one publisher, and the alias's moves must form
one unbroken chain. Deterministic interleavings (a claim lost between listing and claiming, a
412 or a changed pointer under a held lock, a dead lock holder) must lead to a retry, never to
a shared folder or a lost move. The bundles are tiny but real: an xgboost model trained on
random numbers, a valid FeatureSpec and one parquet lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from jobs import registry
from jobs.aliases import alias_uri
from jobs.config import FeaturesConfig, S3Config, SourceConfig
from jobs.errors import BundleError, ConflictError, StorageError
from jobs.featurespec import FeatureSpec, feature_names
from jobs.storage import Storage, join
from jobs.versions import CLAIM, MANIFEST, version_dir

ROOT = Path(__file__).resolve().parents[1]
NAME = "fraud"
PUBLISHERS = 3
PUBLISHES_EACH = {"local": 20, "s3": 6}  # local publishes take ~10 ms: more of them collide
MOVERS = 3
MOVES_EACH = 4
_LOST: Counter = Counter()  # per process: lost claims and alias conflicts seen by a worker


# --- fixtures: a storage root on each backend, and runs to publish from -------------------


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> tuple[Storage, str]:
    """(storage, root URI): a temp dir, or a fresh bucket on the moto server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return Storage(S3Config(endpoint_url=endpoint)), f"s3://{bucket}"


def make_run(storage: Storage, root: str, seed: int) -> str:
    """A run folder with what `publish` reads: a real model, a valid spec, one lookup."""
    features = FeaturesConfig(numeric=["a", "b", "c"])
    spec = FeatureSpec(
        source=SourceConfig(format="parquet", uri="unused"),
        joins=[],
        features=features,
        medians={"a": 0.0, "b": 0.0, "c": 0.0},
        categories={},
        feature_names=feature_names(features),
    )
    rng = np.random.default_rng(seed)
    matrix = xgb.DMatrix(rng.normal(size=(64, 3)), label=rng.integers(0, 2, size=64))
    booster = xgb.train({"max_depth": 2, "nthread": 1}, matrix, num_boost_round=3)
    sink = io.BytesIO()
    pq.write_table(pa.table({"customer_id": ["c1", "c2"], "state_count": [1, seed]}), sink)
    run = join(root, "runs", f"run-{seed}")
    storage.write_bytes(model_of(run), bytes(booster.save_raw("ubj")))
    storage.write_json(join(run, "train", "_result.json"), {"model_uri": model_of(run)})
    storage.write_bytes(join(run, "features", "feature_spec.json"), spec.model_dump_json().encode())
    storage.write_bytes(join(run, "features", "lookups", "history.parquet"), sink.getvalue())
    return run


def publish_from(storage: Storage, registry_uri: str, run: str, tag: object) -> int:
    return registry.publish(storage, registry_uri, NAME, run, 0.5, {"tag": tag}, {"tag": tag})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(storage: Storage, folder: str) -> set[str]:
    """Every file under a folder, hidden ones included, relative to it."""
    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File}


# --- worker processes (module level, so spawn can import them) ----------------------------


class CountingStorage(Storage):
    """Real storage that counts, in this process, the races it lost."""

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        won = super().create_exclusive(uri, data)
        _LOST["claims"] += not won
        return won

    def compare_and_swap(self, uri: str, expected_token: str | None, data: bytes) -> str:
        try:
            return super().compare_and_swap(uri, expected_token, data)
        except ConflictError:
            _LOST["alias"] += 1
            raise


def _wait_until(start_at: float) -> None:
    _LOST.clear()  # pool processes are reused: count this task's races only
    time.sleep(max(0.0, start_at - time.time()))


def _publisher(storage, registry_uri, run, publisher, count, start_at) -> tuple:
    counting = CountingStorage(storage.s3)
    _wait_until(start_at)
    versions = []
    for n in range(count):
        origin = json.dumps({"publisher": publisher, "n": n}).encode()
        versions.append(
            registry.publish(
                counting,
                registry_uri,
                NAME,
                run,
                0.5,
                {"publisher": publisher},
                {"publisher": publisher},
                extra_files={"origin.json": origin},
            )
        )
    return publisher, versions, dict(_LOST)


def _mover(storage, registry_uri, targets, with_rollbacks, start_at) -> tuple:
    counting = CountingStorage(storage.s3)
    _wait_until(start_at)
    pointers = []
    for n, version in enumerate(targets):
        pointers.append(registry.set_alias(counting, registry_uri, NAME, "production", version))
        if with_rollbacks and n % 2 == 0:
            # BundleError: nothing to roll back to at that moment, so no move to record.
            with contextlib.suppress(BundleError):
                pointers.append(registry.rollback(counting, registry_uri, NAME, "production"))
    return targets, pointers, dict(_LOST)


@pytest.fixture(scope="module")
def pool():
    """Spawned worker processes, started once: each pays a few seconds of imports."""
    size = max(PUBLISHERS, MOVERS)
    context = multiprocessing.get_context("spawn")
    with context.Pool(size) as workers:
        # A function of this module: each worker imports it (and the registry) before the test.
        workers.map(_wait_until, [time.time() + 0.3] * size, chunksize=1)
        yield workers


def run_workers(pool, target, argument_lists: list[tuple], timeout: float = 240) -> list:
    """`target(*args, start_at)` for each args, one per process, all starting at one moment."""
    start_at = time.time() + 0.5
    tasks = [(*args, start_at) for args in argument_lists]
    return pool.starmap_async(target, tasks, chunksize=1).get(timeout=timeout)


# --- storage primitives -------------------------------------------------------------------


def test_exclusive_create_and_compare_and_swap(backend):
    storage, root = backend
    claim = join(root, "versions", "000001", CLAIM)
    assert storage.create_exclusive(claim, b"first") is True
    assert storage.create_exclusive(claim, b"second") is False
    assert storage.read_bytes(claim) == b"first"

    pointer = join(root, "aliases", "production.json")
    assert storage.read_with_token(pointer) is None
    token = storage.compare_and_swap(pointer, None, b"v1")
    with pytest.raises(ConflictError, match="production.json changed"):
        storage.compare_and_swap(pointer, None, b"lost")  # exists already
    assert storage.read_with_token(pointer) == (b"v1", token)
    newer = storage.compare_and_swap(pointer, token, b"v2")
    with pytest.raises(ConflictError, match="production.json changed"):
        storage.compare_and_swap(pointer, token, b"lost")  # a stale token
    assert storage.read_with_token(pointer) == (b"v2", newer)
    assert storage.list_files(join(root, "aliases")) == [pointer]  # lock and temp are hidden


def test_storage_failures_name_the_uri(s3_server, tmp_path):
    s3 = Storage(S3Config(endpoint_url=s3_server))
    uri = "s3://no-such-bucket-here/aliases/production.json"
    for attempt in (
        lambda: s3.create_exclusive(uri, b"x"),
        lambda: s3.compare_and_swap(uri, None, b"x"),
        lambda: s3.read_with_token(uri),
    ):
        with pytest.raises(StorageError, match="no-such-bucket-here/aliases/production.json"):
            attempt()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=f"{blocker}/000001"):
        Storage().create_exclusive(str(blocker / "000001" / CLAIM), b"x")


def model_of(run: str) -> str:
    """Where a run's (only) training put its model, as `train/_result.json` names it."""
    return join(run, "train", "models", "only", "model.ubj")


# --- publishing ---------------------------------------------------------------------------


def test_publish_with_model_uri_and_extra_files(backend):
    storage, root = backend
    registry_uri = join(root, "registry")
    run, other = make_run(storage, root, 1), make_run(storage, root, 2)
    other_model = model_of(other)
    calibration = {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 1.0]}
    version = registry.publish(
        storage,
        registry_uri,
        NAME,
        run,
        0.4,
        {"auc": 0.9},
        {"run": run},
        model_uri=other_model,
        extra_files={"calibration.json": json.dumps(calibration).encode(), "notes.txt": b"hi"},
    )
    bundle = registry.load_bundle(storage, registry_uri, NAME, version)
    assert bundle.calibration == calibration
    assert bundle.extras == {"calibration.json": calibration, "notes.txt": b"hi"}
    folder = version_dir(registry_uri, NAME, version)
    assert storage.read_bytes(join(folder, "model.ubj")) == storage.read_bytes(other_model)
    manifest = storage.read_json(join(folder, MANIFEST))
    assert set(manifest["files"]) | {MANIFEST} == files_in(storage, folder)
    assert {"calibration.json", "notes.txt", CLAIM} <= set(manifest["files"])

    plain = publish_from(storage, registry_uri, run, "plain")  # positional call, no extras
    assert registry.load_bundle(storage, registry_uri, NAME, plain).calibration is None
    for bad, data in [("manifest.json", b"{}"), ("_x.json", b"{}"), ("a.json", b"not json")]:
        with pytest.raises(BundleError, match=bad):
            registry.publish(storage, registry_uri, NAME, run, 0.4, {}, {}, extra_files={bad: data})
    assert registry.list_versions(storage, registry_uri, NAME) == [version, plain]


class ClaimRacer(Storage):
    """Another publisher claims the same number between our listing and our claim (once)."""

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        if uri.endswith(CLAIM) and not _LOST["raced"]:
            _LOST["raced"] += 1
            assert Storage(self.s3).create_exclusive(uri, b'{"owner": "the other publisher"}')
        return super().create_exclusive(uri, data)


def test_publisher_that_loses_the_claim_takes_the_next_version(backend):
    storage, root = backend
    registry_uri = join(root, "registry")
    run = make_run(storage, root, 1)
    assert publish_from(storage, registry_uri, run, "first") == 1
    _LOST.clear()
    assert publish_from(ClaimRacer(storage.s3), registry_uri, run, "second") == 3
    assert _LOST["raced"] == 1
    # The folder it lost holds only the winner's claim: nothing of ours was written there.
    assert files_in(storage, version_dir(registry_uri, NAME, 2)) == {CLAIM}
    assert storage.read_json(join(version_dir(registry_uri, NAME, 2), CLAIM)) == {
        "owner": "the other publisher"
    }
    assert registry.list_versions(storage, registry_uri, NAME) == [1, 3]
    assert registry.load_bundle(storage, registry_uri, NAME, 3).metrics == {"tag": "second"}


def test_concurrent_publishers_never_share_a_version(backend, pool):
    storage, root = backend
    registry_uri = join(root, "registry")
    runs = {p: make_run(storage, root, p) for p in range(PUBLISHERS)}
    each = PUBLISHES_EACH["s3" if root.startswith("s3://") else "local"]
    started = time.perf_counter()
    results = run_workers(
        pool, _publisher, [(storage, registry_uri, runs[p], p, each) for p in range(PUBLISHERS)]
    )
    seconds = time.perf_counter() - started
    by_publisher = {publisher: versions for publisher, versions, _ in results}

    total = PUBLISHERS * each
    everything = [v for versions in by_publisher.values() for v in versions]
    assert sorted(everything) == list(range(1, total + 1)), by_publisher  # distinct, no gaps
    assert registry.list_versions(storage, registry_uri, NAME) == list(range(1, total + 1))
    for publisher, versions in by_publisher.items():
        assert versions == sorted(versions)
        model = sha(storage.read_bytes(model_of(runs[publisher])))
        for n, version in enumerate(versions):
            bundle = registry.load_bundle(storage, registry_uri, NAME, version)  # checksums
            folder = version_dir(registry_uri, NAME, version)
            manifest = storage.read_json(join(folder, MANIFEST))
            claim = storage.read_json(join(folder, CLAIM))
            # Every file in the folder is the manifest's, and all of it is this publisher's.
            assert files_in(storage, folder) == set(manifest["files"]) | {MANIFEST}
            assert manifest["files"]["model.ubj"] == model
            assert bundle.extras["origin.json"] == {"publisher": publisher, "n": n}
            assert bundle.metrics == bundle.lineage == {"publisher": publisher}
            assert claim["owner"] == manifest["publisher"] == bundle.info["publisher"]
            assert (claim["version"], bundle.info["version"]) == (version, version)
            assert bundle.info["run_uri"] == runs[publisher]
    lost = sum(counts.get("claims", 0) for _, _, counts in results)
    print(f"{total} concurrent publishes in {seconds:.1f} s, {lost} claims lost and retried")


# --- aliases ------------------------------------------------------------------------------


def check_chain(pointers: list[dict], final: dict) -> None:
    """The returned pointers are one serial history: each move follows from the one before."""
    ordered = sorted(pointers, key=lambda p: p["sequence"])
    assert [p["sequence"] for p in ordered] == list(range(1, len(ordered) + 1))
    assert final == ordered[-1]
    before = {"version": None, "history": []}
    for pointer in ordered:
        assert pointer["previous"] == before["version"], pointer
        if pointer["reason"].startswith("rollback from"):
            assert pointer["version"] == before["history"][-1], pointer
            assert pointer["history"] == before["history"][:-1], pointer
        else:
            moved = before["version"] not in (None, pointer["version"])
            expected = before["history"] + [before["version"]] * moved
            assert pointer["history"] == expected[-50:], pointer
        before = pointer


@pytest.mark.parametrize("with_rollbacks", [False, True], ids=["set", "set+rollback"])
def test_concurrent_alias_moves_are_serialized(backend, with_rollbacks, pool):
    storage, root = backend
    registry_uri = join(root, "registry")
    run = make_run(storage, root, 1)
    total = MOVERS * MOVES_EACH
    for n in range(total):
        publish_from(storage, registry_uri, run, n)
    targets = [list(range(1 + m, total + 1, MOVERS)) for m in range(MOVERS)]
    started = time.perf_counter()
    results = run_workers(
        pool, _mover, [(storage, registry_uri, t, with_rollbacks) for t in targets]
    )
    seconds = time.perf_counter() - started

    pointers = sorted(
        (p for _, returned, _ in results for p in returned), key=lambda p: p["sequence"]
    )
    final = registry.get_alias(storage, registry_uri, NAME, "production")
    check_chain(pointers, final)
    sets = [p for p in pointers if not p["reason"].startswith("rollback")]
    assert sorted(p["version"] for p in sets) == list(range(1, total + 1))
    if not with_rollbacks:  # every move is in the history exactly once, in the order made
        assert len(pointers) == final["sequence"] == total
        assert final["history"] + [final["version"]] == [p["version"] for p in sets]
        assert sorted(final["history"] + [final["version"]]) == list(range(1, total + 1))
    conflicts = sum(counts.get("alias", 0) for _, _, counts in results)
    print(f"{len(pointers)} concurrent moves in {seconds:.1f} s, {conflicts} conflicts retried")


class MoveRacer(Storage):
    """Another writer moves the alias to version 2 between our read and our write (once)."""

    def compare_and_swap(self, uri: str, expected_token: str | None, data: bytes) -> str:
        if not _LOST["raced"]:
            _LOST["raced"] += 1
            registry_uri = uri.rsplit(f"/{NAME}/aliases/", 1)[0]
            registry.set_alias(Storage(self.s3), registry_uri, NAME, "production", 2)
        try:
            return super().compare_and_swap(uri, expected_token, data)
        except ConflictError:
            _LOST["conflicts"] += 1
            raise


def test_a_lost_alias_race_is_retried_not_lost(backend):
    storage, root = backend
    registry_uri = join(root, "registry")
    run = make_run(storage, root, 1)
    for n in range(3):
        publish_from(storage, registry_uri, run, n)
    registry.set_alias(storage, registry_uri, NAME, "production", 1)

    _LOST.clear()  # set_alias(3) races with a move to 2: the 412 / changed token is retried
    pointer = registry.set_alias(MoveRacer(storage.s3), registry_uri, NAME, "production", 3)
    assert _LOST["conflicts"] == 1
    assert (pointer["version"], pointer["history"], pointer["sequence"]) == (3, [1, 2], 3)
    assert registry.get_alias(storage, registry_uri, NAME, "production") == pointer

    registry.set_alias(storage, registry_uri, NAME, "production", 1)  # 1, history [1, 2, 3]
    _LOST.clear()  # a rollback racing with a move to 2 rolls back from 2, not from 1
    pointer = registry.rollback(MoveRacer(storage.s3), registry_uri, NAME, "production")
    assert _LOST["conflicts"] == 1
    assert (pointer["version"], pointer["history"]) == (1, [1, 2, 3])
    assert pointer["reason"] == "rollback from 2" and pointer["sequence"] == 6


# --- local locks: held, dead and timed-out holders ---------------------------------------

HOLDER = """
import fcntl, os, sys, time
from contextlib import contextmanager
from jobs import registry
from jobs.storage import Storage

class AlreadyLocked(Storage):  # this process holds the lock through its own descriptor
    @contextmanager
    def _local_lock(self, path, uri):
        yield

lock, registry_uri, seconds, move_to = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
descriptor = os.open(lock, os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(seconds)
if move_to != "-":  # a move made while holding the lock, as a slow writer would
    registry.set_alias(AlreadyLocked(), registry_uri, "fraud", "production", int(move_to))
"""


def hold_lock(registry_uri: str, seconds: float, move_to: int | None) -> subprocess.Popen:
    lock = Path(alias_uri(registry_uri, NAME, "production")).with_name(".production.json.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), registry_uri, str(seconds), str(move_to or "-")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_held_lock_is_waited_for_and_a_move_under_it_is_not_lost(tmp_path):
    storage, registry_uri = Storage(), str(tmp_path / "registry")
    run = make_run(storage, str(tmp_path), 1)
    for n in range(3):
        publish_from(storage, registry_uri, run, n)
    registry.set_alias(storage, registry_uri, NAME, "production", 1)

    holder = hold_lock(registry_uri, 1.0, move_to=2)
    started = time.perf_counter()
    pointer = registry.set_alias(storage, registry_uri, NAME, "production", 3)
    waited = time.perf_counter() - started
    assert holder.wait(timeout=30) == 0
    assert waited > 0.5, "the move should have waited for the held lock"
    # Our read predates the holder's move to 2; the compare under the lock caught it.
    assert (pointer["version"], pointer["history"], pointer["sequence"]) == (3, [1, 2], 3)
    assert registry.get_alias(storage, registry_uri, NAME, "production") == pointer


def test_lock_of_a_dead_holder_is_free_and_a_live_one_times_out(tmp_path):
    registry_uri = str(tmp_path / "registry")
    run = make_run(Storage(), str(tmp_path), 1)
    publish_from(Storage(), registry_uri, run, 0)
    registry.set_alias(Storage(), registry_uri, NAME, "production", 1)
    before = registry.get_alias(Storage(), registry_uri, NAME, "production")

    holder = hold_lock(registry_uri, 600, move_to=None)
    try:
        impatient = Storage(lock_timeout_s=0.3)
        with pytest.raises(StorageError, match="production.json is locked by another writer"):
            registry.set_alias(impatient, registry_uri, NAME, "production", 1, reason="x")
        assert registry.get_alias(Storage(), registry_uri, NAME, "production") == before

        killer = threading.Timer(0.5, os.kill, (holder.pid, signal.SIGKILL))
        killer.start()  # the holder dies mid-wait; the kernel releases its flock
        started = time.perf_counter()
        pointer = registry.set_alias(Storage(), registry_uri, NAME, "production", 1, "after")
        assert 0.3 < time.perf_counter() - started < 10
        killer.join()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (pointer["version"], pointer["reason"], pointer["sequence"]) == (1, "after", 2)

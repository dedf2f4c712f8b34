"""The registry in a real PostgreSQL server: the same behaviour as the folder store, shared by
replicas that have no common folder, and concurrent writers (threads and processes) that lose
nothing; tenants' quotas and configs in flight across replicas; leases of a dead replica lapse."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vsteer._errors import NameConflictError, VectorFileError
from vsteer.server.tenants import Tenant, TenantDirectory, TenantLimits, TenantsFile, _LimitError
from vsteer.vectors import SteeringVector, VectorStore
from vsteer.vectors._pg_store import PgVectorStore, pool

TENANTS = TenantsFile(tenants={"alice": TenantLimits(keys=["k-alice"], max_vectors=40, max_configs_in_flight=2),
                               "bob": TenantLimits(keys=["k-bob"])})
ALICE = Tenant("alice", TENANTS.tenants["alice"])
BOB = Tenant("bob", TENANTS.tenants["bob"])


def make(seed: int = 0) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector.from_tensors({1: torch.randn(8, generator=gen), 3: torch.randn(8, generator=gen)})


def pg_tenants(url: str, root: Path):
    from vsteer.server.tenants_pg import PgTenantDirectory

    return PgTenantDirectory(TENANTS, root, url)


# ---------------------------------------------------------------------- the store


def test_replicas_without_a_shared_folder_see_one_registry(registry_url, tmp_path):
    a, b = PgVectorStore(tmp_path / "a", registry_url), PgVectorStore(tmp_path / "b", registry_url)
    v = make(1)
    sha = a.put(v)
    a.set_name("happy", sha)
    assert sha in b and b.resolve("happy") == sha and b.names() == {"happy": sha}
    assert not (tmp_path / "b" / f"{sha}.safetensors").exists()
    assert torch.equal(b.get(sha).layers[3], v.layers[3])  # fetched once into b's cache
    assert (tmp_path / "b" / f"{sha}.safetensors").exists()
    info = b.info("happy")
    assert info["names"] == ["happy"] and info["layers"] == [1, 3] and info["sha256"] == sha
    b.delete("happy")
    assert sha not in a and a.names() == {} and a.list() == []
    with pytest.raises(VectorFileError):
        a.resolve(sha)


def test_a_name_is_repointed_only_when_asked(registry_url, tmp_path):
    store = PgVectorStore(tmp_path, registry_url)
    one, two = store.put(make(1)), store.put(make(2))
    store.set_name("x", one)
    with pytest.raises(NameConflictError):
        store.set_name("x", two)
    assert store.resolve("x") == one
    store.set_name("x", two, overwrite=True)
    assert store.resolve("x") == two
    with pytest.raises(VectorFileError):
        store.set_name("y", "0" * 64)  # no such vector: refused by the foreign key


def test_a_folder_store_is_imported(registry_url, tmp_path):
    folder = VectorStore(tmp_path / "old")
    shas = [folder.put(make(i)) for i in range(3)]
    folder.set_name("a", shas[0])
    folder.set_name("b", shas[1])
    pg = PgVectorStore(tmp_path / "cache", registry_url)
    pg.put(make(7))
    pg.set_name("b", pg.put(make(8)))  # already taken here: reported, left as it was
    assert pg.import_folder(folder) == {"vectors": 3, "names": 1, "conflicts": 1}
    assert pg.resolve("a") == shas[0] and pg.resolve("b") != shas[1] and set(shas) <= set(pg.list())
    assert pg.import_folder(folder) == {"vectors": 0, "names": 0, "conflicts": 1}  # idempotent


_OPS = st.lists(st.tuples(st.sampled_from(["put", "name", "rename", "unname", "delete"]),
                          st.integers(0, 3), st.sampled_from(["a", "b", "c"])), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_the_database_store_behaves_as_the_folder_store(registry_url, tmp_path_factory, ops):
    """Random sequences of writes give the same names, vectors and refusals in both stores."""
    with pool(registry_url).connection() as conn:
        conn.execute("TRUNCATE vsteer_vectors, vsteer_names, vsteer_tenant_vectors, vsteer_tenant_names CASCADE")
    root = tmp_path_factory.mktemp("ops")
    stores = [VectorStore(root / "folder"), PgVectorStore(root / "cache", registry_url)]
    vectors = [make(i) for i in range(4)]
    for op, i, name in ops:
        outcomes = []
        for store in stores:
            try:
                if op == "put":
                    store.put(vectors[i])
                elif op in ("name", "rename"):
                    store.set_name(name, vectors[i].sha256, overwrite=op == "rename")
                elif op == "unname":
                    store.remove_name(name)
                else:
                    store.delete(vectors[i].sha256)
                outcomes.append(None)
            except VectorFileError as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == outcomes[1], (op, i, name)
        assert stores[0].names() == stores[1].names() and stores[0].list() == stores[1].list()


# ---------------------------------------------------------------------- tenants across replicas


def _replica(kind: str, url: str, root: str, seeds: list[int], tenant: str, barrier, results) -> None:
    """One "replica": adds vectors for ``tenant`` from 16 threads at once, starting together with
    the other replica; puts its outcomes on ``results``."""
    who = {"alice": ALICE, "bob": BOB}[tenant]
    root_path = Path(root)
    if kind == "pg":
        store, tenants = PgVectorStore(root_path / "cache", url), pg_tenants(url, root_path / "cache")
    else:
        store, tenants = VectorStore(root_path), TenantDirectory(TENANTS, root_path)
    shas = {seed: store.put(make(seed)) for seed in seeds}  # then only the ownership writes race

    def one(seed: int) -> str:
        try:
            tenants.add(who, shas[seed], f"v{seed}")
        except _LimitError:
            return "limit"
        return "ok"

    barrier.wait(60)
    with ThreadPoolExecutor(16) as threads:
        results.put(list(threads.map(one, seeds)))


def _two_replicas(kind: str, url: str, roots: tuple[Path, Path], seeds: list[int], tenant: str) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(kind, url, str(root), seeds[i::2], tenant, barrier, results))
             for i, root in enumerate(roots)]
    for proc in procs:
        proc.start()
    outcomes = results.get(timeout=120) + results.get(timeout=120)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    return outcomes


def test_concurrent_uploads_on_two_replicas_lose_none_and_the_quota_holds(registry_url, tmp_path):
    """Each process is a replica with its own cache folder; alice may own 40 vectors."""
    outcomes = _two_replicas("pg", registry_url, (tmp_path / "r1", tmp_path / "r2"), list(range(60)), "alice")
    assert outcomes.count("ok") == 40 and outcomes.count("limit") == 20
    owned = pg_tenants(registry_url, tmp_path / "r3").owned(ALICE)
    assert len(owned["vectors"]) == 40 and len(owned["names"]) == 40
    assert {owned["names"][n] for n in owned["names"]} == set(owned["vectors"])


def test_concurrent_uploads_on_one_shared_folder_lose_none(tmp_path):
    """The folder registry (one machine, several processes) no longer loses ownership entries."""
    outcomes = _two_replicas("folder", "", (tmp_path, tmp_path), list(range(200)), "bob")
    assert outcomes.count("ok") == 200
    owned = TenantDirectory(TENANTS, tmp_path).owned(BOB)
    assert len(owned["vectors"]) == 200 and len(owned["names"]) == 200


def test_two_hundred_uploads_on_two_replicas_lose_none(registry_url, tmp_path):
    outcomes = _two_replicas("pg", registry_url, (tmp_path / "r1", tmp_path / "r2"), list(range(200)), "bob")
    assert outcomes.count("ok") == 200
    owned = pg_tenants(registry_url, tmp_path / "r3").owned(BOB)
    assert len(owned["vectors"]) == 200 and len(owned["names"]) == 200


def test_configs_in_flight_hold_across_replicas(registry_url, tmp_path):
    one, two = pg_tenants(registry_url, tmp_path), pg_tenants(registry_url, tmp_path)
    one.start(ALICE, "c1")
    two.start(ALICE, "c1")  # the same config again: no new one
    two.start(ALICE, "c2")
    with pytest.raises(_LimitError):
        one.start(ALICE, "c3")
    one.start(BOB, "c3")  # another tenant's limit is its own
    two.finish(ALICE, "c2")
    one.start(ALICE, "c3")
    one.finish(ALICE, "c1")
    with pytest.raises(_LimitError):
        two.start(ALICE, "c4")  # c1 still runs on replica two
    for d in (one, two):
        d.close()


def test_a_dead_replica_cannot_keep_a_tenant_at_its_limit(registry_url, tmp_path, monkeypatch):
    import vsteer.server.tenants_pg as tenants_pg

    monkeypatch.setattr(tenants_pg, "LEASE_SECONDS", 1.0)
    alive, dead, other = (pg_tenants(registry_url, tmp_path) for _ in range(3))
    alive.start(ALICE, "c1")
    dead.start(ALICE, "c2")
    dead._stop.set()  # the replica died: it renews nothing, and never finishes
    with pytest.raises(_LimitError):
        other.start(ALICE, "c3")
    time.sleep(2.5)  # past the lease: the dead replica's lapsed, the live one's was renewed
    other.start(ALICE, "c3")
    with pytest.raises(_LimitError):
        other.start(ALICE, "c4")
    for d in (alive, other):
        d.close()


def test_content_stays_while_another_tenant_owns_it(registry_url, tmp_path):
    store, tenants = PgVectorStore(tmp_path, registry_url), pg_tenants(registry_url, tmp_path)
    sha = store.put(make(5))
    tenants.add(ALICE, sha, "mine")
    tenants.add(BOB, sha, "theirs")
    with pytest.raises(NameConflictError):
        tenants.add(ALICE, store.put(make(6)), "mine")
    tenants.remove(ALICE, sha)
    tenants.collect(sha, store)
    assert sha in store and tenants.visible(BOB, "theirs", {}) == sha and tenants.visible(ALICE, "mine", {}) is None
    tenants.remove(BOB, sha)
    tenants.collect(sha, store)
    assert sha not in store


def test_the_cli_imports_a_folder_store_with_its_tenants_and_then_manages_the_registry(registry_url, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from vsteer.cli.vectors import vectors

    folder = VectorStore(tmp_path / "old")
    public, owned = folder.put(make(1)), folder.put(make(2))
    folder.set_name("pub", public)
    TenantDirectory(TENANTS, folder.root).add(BOB, owned, "bobs")
    (tmp_path / "tenants.json").write_text(TENANTS.model_dump_json())
    monkeypatch.setenv("VSTEER_REGISTRY_URL", registry_url)
    monkeypatch.setenv("VSTEER_VECTOR_STORE", str(tmp_path / "cache"))
    runner = CliRunner()
    done = runner.invoke(vectors, ["import-store", str(folder.root), "--tenants", str(tmp_path / "tenants.json")])
    assert done.exit_code == 0, done.output
    assert pg_tenants(registry_url, tmp_path).owned(BOB) == {"names": {"bobs": owned}, "vectors": [owned]}
    listed = runner.invoke(vectors, ["list", "--json"])
    assert listed.exit_code == 0 and {v["sha256"] for v in json.loads(listed.stdout)} == {public, owned}
    assert runner.invoke(vectors, ["rm", "pub"]).exit_code == 0
    assert PgVectorStore(tmp_path / "elsewhere", registry_url).names() == {}
    monkeypatch.setenv("VSTEER_REGISTRY_URL", "mysql://nope")
    bad = runner.invoke(vectors, ["list"])
    assert bad.exit_code != 0 and "VSTEER_REGISTRY_URL" in str(bad.exception or bad.output)

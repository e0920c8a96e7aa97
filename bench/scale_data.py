"""bench/scale.py's data: clustered 512-d vectors in an fp16 file, queries, exact top-10, a token store.

Everything is written once under the work directory and reused by later runs. Vectors are read back in
chunks with plain reads, never mapped, so they do not count in a measuring process's RSS."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

DIM = 512
CENTRES = 4096
LATENT = 32
SPREAD = 0.5  # a cluster's standard deviation around its centre, in units of the centres' spread
CHUNK = 65_536
EXTRA = 20_000  # vectors beyond N: the live-apply batches add them


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def rss_mib(field: str = "VmHWM") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Mixture:
    """Unit vectors shaped like CLIP embeddings (bench/ann_recall.py's generator with tighter clusters, drawn
    in chunks): a shared direction (anisotropy), Gaussian clusters around CENTRES centres on a LATENT-
    dimensional subspace, SPREAD wide, and isotropic noise. Nearest-neighbour cosine ~0.81, 10th ~0.78,
    a random pair ~0.37. Uniform random 512-d vectors, where every point is about equally far from every
    other, are a worst case no real CLIP library has."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.common = _unit(rng.standard_normal((1, DIM)))
        self.basis = np.linalg.qr(rng.standard_normal((DIM, LATENT)))[0].T.astype(np.float32)
        self.centres = rng.standard_normal((CENTRES, LATENT)).astype(np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = self.centres[rng.integers(0, CENTRES, n)] + SPREAD * rng.standard_normal((n, LATENT), np.float32)
        noise = _unit(rng.standard_normal((n, DIM), np.float32))
        return _unit(0.6 * self.common + 0.7 * _unit(z @ self.basis) + 0.35 * noise)


def vectors_path(work: Path, n: int) -> Path:
    return work / f"vectors-{n + EXTRA}.f16"


def generate(work: Path, n: int, n_queries: int, seed: int) -> None:
    """The fp16 vector file (N + EXTRA rows) and the queries (drawn from the same mixture, not indexed)."""
    work.mkdir(parents=True, exist_ok=True)
    mix = Mixture(seed)
    path = vectors_path(work, n)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        rng = np.random.default_rng([seed, n])
        with open(tmp, "wb") as out:
            for start in range(0, n + EXTRA, CHUNK):
                mix.draw(min(CHUNK, n + EXTRA - start), rng).astype(np.float16).tofile(out)
        tmp.rename(path)
    queries = work / f"queries-{n_queries}.npy"
    if not queries.exists():
        np.save(queries, mix.draw(n_queries, np.random.default_rng([seed, 1, n_queries])))


def read_rows(path: Path, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) as float32, by a plain read."""
    return (
        np.fromfile(path, np.float16, count * DIM, offset=start * DIM * 2).reshape(-1, DIM).astype(np.float32)
    )


def ground_truth(work: Path, n: int, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k row numbers of each query among the first N rows, by batched matmul."""
    path = work / f"truth-{n}-{len(queries)}.npy"
    if path.exists():
        return np.load(path)
    q = _unit(queries)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for start in range(0, n, CHUNK):
        s = q @ read_rows(vectors_path(work, n), start, min(CHUNK, n - start)).T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        pick = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, pick, 1), np.take_along_axis(cand_i, pick, 1)
    np.save(path, best_i)
    return best_i


def token_store_dir(work: Path, n: int) -> Path:
    return work / f"tokens-{n + EXTRA}"


def fill_token_store(work: Path, n: int) -> None:
    """A T=1 token store holding every vector (ids = row numbers), for exact re-scoring."""
    from indexer.token_store import TokenStore

    done = token_store_dir(work, n) / "COMPLETE"
    if done.exists():
        return
    store = TokenStore(token_store_dir(work, n), 1, DIM)
    for start in range(0, n + EXTRA, CHUNK):
        rows = read_rows(vectors_path(work, n), start, min(CHUNK, n + EXTRA - start))
        store.put_many(np.arange(start, start + len(rows)), rows[:, None, :].astype(np.float16), rows)
    store.flush()
    store.close()
    done.write_text("ok")

"""bench/scale.py through its command line: a tiny run on the CPU, and a GPU device refused where faiss has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import pytest

REPO = Path(__file__).resolve().parents[2]


def _scale(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bench.scale", "--work-dir", str(tmp_path / "work"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_tiny_flat_run_reports_its_device_recall_and_live_apply(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = _scale(
        "--sizes", "3000", "--kinds", "flat", "--queries", "30", "--flat-queries", "30",
        "--apply-batches", "1", "--apply-batch", "100", "--quiet-s", "0.2", "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert (row["n"], row["device"], row["factory"], row["queries"]) == (3000, "cpu", "Flat", 30)
    assert row["recall@10"] >= 0.99  # exact search against the exact top-10 of the same fp16 vectors
    assert row["load_x_file"] > 0 and row["searches_during"] >= 0 and row["p99_ratio"] > 0
    assert "| 3000 | cpu | Flat |" in proc.stdout


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")
def test_a_gpu_index_device_without_faiss_gpu_support_exits_2_before_any_work(tmp_path: Path) -> None:
    proc = _scale("--index-device", "cuda", "--sizes", "3000", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "--index-device cuda: faiss has no GPU support" in proc.stderr
    assert not (tmp_path / "work").exists()  # no data generated


@pytest.mark.gpu
def test_on_a_gpu_the_broad_view_finds_the_exact_top10_and_applies_live_adds(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = _scale(
        "--index-device", "cuda", "--sizes", "12000", "--kinds", "flat,ivfpq", "--nlist", "16", "--pq-m", "8",
        "--nprobe", "16", "--rerank", "100", "--queries", "50", "--flat-queries", "50", "--apply-batches", "1",
        "--apply-batch", "100", "--quiet-s", "0.2", "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["factory"]: row for row in json.loads(out.read_text())}
    assert {row["device"] for row in rows.values()} == {"cuda"}
    assert rows["Flat"]["recall@10"] >= 0.98  # fp16 storage on the GPU: near-ties may swap
    assert rows["IVF16,PQ8np"]["recall@10"] >= 0.9  # every list probed, then re-scored exactly

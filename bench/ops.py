"""Benchmark of the reid_ops extension against the dense/unfused references it replaces.

Run from the repository root:  python bench/ops.py [--quick] [--msmt] [--out bench/results/ops.json]

The evaluate_rank reference compiled with Cython needs `pip install Cython` (a benchmark-only dependency); without it
that row is left out.

Every case runs in a fresh process (multiprocessing "spawn"), so its peak memory is its own: the child builds its
inputs, resets its RSS high-water mark (/proc/self/clear_refs), runs the operation and reports the wall time and
the high-water mark minus the RSS it had before the operation (inputs excluded, outputs included). A table with the
ratio of each op to its reference and the issue's targets is printed and the numbers are written to a JSON file
(atomically: temp file, then os.replace). This is a benchmark, never a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL_SIZES = {
    "rerank": {"num_query": 2000, "num_gallery": 10000, "dim": 2048},
    "jaccard": {"n": 30000, "dim": 2048},
    "jaccard_dense": {"n": 10000, "dim": 2048},  # the dense reference needs ~3 N^2 float32 (10.8 GB at 30,000)
    "gem": {"shape": (64, 2048, 24, 8)},
    "metrics": {"num_query": 2000, "num_gallery": 10000},
    "msmt": {"num_query": 11659, "num_gallery": 82161, "dim": 2048},
}
QUICK_SIZES = {
    "rerank": {"num_query": 60, "num_gallery": 300, "dim": 64},
    "jaccard": {"n": 500, "dim": 64},
    "jaccard_dense": {"n": 500, "dim": 64},
    "gem": {"shape": (4, 64, 24, 8)},
    "metrics": {"num_query": 100, "num_gallery": 500},
    "msmt": {"num_query": 100, "num_gallery": 700, "dim": 64},
}


# --------------------------------------------------------------------------------------------------------------
# Inputs (built inside each child from a seed, so no large array crosses a process boundary)
# --------------------------------------------------------------------------------------------------------------


def clustered_features(n: int, dim: int, seed: int, num_clusters: int | None = None) -> np.ndarray:
    """L2-normalised float32 features around Gaussian identity centres (~8 images per centre by default)."""
    gen = torch.Generator().manual_seed(seed)
    num_clusters = num_clusters or max(1, n // 8)
    centres = torch.randn(num_clusters, dim, generator=gen)
    assignment = torch.randint(0, num_clusters, (n,), generator=gen)
    x = centres[assignment]
    x += 0.7 * torch.randn(n, dim, generator=gen)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.numpy()


def euclidean_blocks_torch(query: torch.Tensor, gallery: torch.Tensor):
    """q_g, q_q, g_g Euclidean distances as a user of the classic API computes them (torch.cdist, fp32)."""
    return tuple(torch.cdist(a, b).numpy() for a, b in ((query, gallery), (query, query), (gallery, gallery)))


def ranking_problem(num_query: int, num_gallery: int, seed: int):
    rng = np.random.default_rng(seed)
    num_pids = max(2, num_gallery // 10)
    query_pids = rng.integers(0, num_pids, num_query)
    gallery_pids = rng.integers(0, num_pids, num_gallery)
    query_camids = rng.integers(0, 6, num_query)
    gallery_camids = rng.integers(0, 6, num_gallery)
    distmat = rng.random((num_query, num_gallery), dtype=np.float32)
    distmat -= 0.2 * (query_pids[:, None] == gallery_pids[None, :])
    return distmat, query_pids, gallery_pids, query_camids, gallery_camids


# The fast-reid-style Cython evaluator, written here from the published algorithm: numpy argsort of every query row
# over the gallery, then per query a typed loop that skips same-identity-same-camera items, accumulates the matches
# (CMC) and the precision at each hit (AP) and the rank of the last hit (INP). Compiled on first use (cached).
CYTHON_EVALUATOR = """
# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
import numpy as np


def evaluate_rank_cython(float[:, ::1] distmat, long[::1] q_pids, long[::1] g_pids, long[::1] q_camids,
                         long[::1] g_camids, long max_rank):
    cdef long num_q = distmat.shape[0], num_g = distmat.shape[1]
    cdef long[:, ::1] order = np.argsort(distmat, axis=1)
    cdef double[:, ::1] all_cmc = np.zeros((num_q, max_rank), dtype=np.float64)
    cdef double[::1] all_ap = np.zeros(num_q, dtype=np.float64)
    cdef double[::1] all_inp = np.zeros(num_q, dtype=np.float64)
    cdef long q, r, g, kept, hits, first_hit, last_hit, num_valid = 0
    cdef double precision_sum
    for q in range(num_q):
        kept = 0
        hits = 0
        first_hit = -1
        last_hit = -1
        precision_sum = 0.0
        for r in range(num_g):
            g = order[q, r]
            if g_pids[g] == q_pids[q]:
                if g_camids[g] == q_camids[q]:
                    continue  # junk: same identity, same camera
                hits += 1
                precision_sum += hits / (kept + 1.0)
                if first_hit < 0:
                    first_hit = kept
                last_hit = kept
            kept += 1
        if hits == 0:
            continue
        num_valid += 1
        for r in range(first_hit, max_rank):
            all_cmc[num_valid - 1, r] = 1.0
        all_ap[num_valid - 1] = precision_sum / hits
        all_inp[num_valid - 1] = hits / (last_hit + 1.0)
    return (np.asarray(all_cmc[:num_valid]).mean(0), float(np.mean(all_ap[:num_valid])),
            float(np.mean(all_inp[:num_valid])), num_valid)
"""


def cython_evaluator():
    """Compiles CYTHON_EVALUATOR once (cached by source hash under ~/.cache) and returns the function, or None when
    Cython is not installed."""
    try:
        import pyximport
    except ImportError:
        return None
    name = "reid_bench_rank_" + hashlib.sha1(CYTHON_EVALUATOR.encode()).hexdigest()[:12]
    cache = Path.home() / ".cache" / "reid_ops_bench"
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"{name}.pyx"
    if not source.exists():
        tmp = source.with_name(source.name + ".tmp")
        tmp.write_text(CYTHON_EVALUATOR)
        os.replace(tmp, source)
    pyximport.install(build_dir=str(cache / "build"), setup_args={"include_dirs": np.get_include()}, language_level=3)
    sys.path.insert(0, str(cache))
    return importlib.import_module(name).evaluate_rank_cython


# --------------------------------------------------------------------------------------------------------------
# Cases: each returns a callable that runs the measured work once, built after the inputs exist
# --------------------------------------------------------------------------------------------------------------


def prepare_case(name: str, sizes: dict, k1: int, k2: int, lambda_value: float):
    import reid_ops
    from reid_ops._reference import (
        evaluate_rank_ref,
        evaluate_rank_torchreid_loop,
        gem_ref,
        jaccard_dense,
        knn_blocked_torch,
        re_ranking_classic,
    )

    if name.startswith("rerank"):
        s = sizes["msmt"] if name == "rerank_msmt_ops" else sizes["rerank"]
        features = clustered_features(s["num_query"] + s["num_gallery"], s["dim"], seed=1)
        query, gallery = torch.from_numpy(features[: s["num_query"]]), torch.from_numpy(features[s["num_query"] :])
        if name in ("rerank_features_ops", "rerank_msmt_ops"):
            return lambda: reid_ops.re_ranking(query, gallery, k1, k2, lambda_value)
        if name == "rerank_features_ops_fp32":
            return lambda: reid_ops.re_ranking(query, gallery, k1, k2, lambda_value, candidate_precision="fp32")
        if name == "rerank_features_classic":
            return lambda: re_ranking_classic(*euclidean_blocks_torch(query, gallery), k1, k2, lambda_value)
        q_g, q_q, g_g = euclidean_blocks_torch(query, gallery)  # precomputed: not part of the measurement
        if name == "rerank_distances_ops":
            return lambda: reid_ops.re_ranking_from_distances(q_g, q_q, g_g, k1, k2, lambda_value)
        if name == "rerank_distances_classic":
            return lambda: re_ranking_classic(q_g, q_q, g_g, k1, k2, lambda_value)
    if name.startswith("jaccard"):
        s = sizes["jaccard_dense"] if name.endswith("_small") or name == "jaccard_dense" else sizes["jaccard"]
        features = clustered_features(s["n"], s["dim"], seed=2)
        if name.startswith("jaccard_ops"):
            return lambda: reid_ops.jaccard_graph(features, 20, 6)
        if name.startswith("jaccard_knn_gemm"):
            features_t = torch.from_numpy(features)
            return lambda: knn_blocked_torch(features_t, 20)
        if name == "jaccard_dense":
            return lambda: jaccard_dense(features, 20, 6)
    if name.startswith("gem"):
        gen = torch.Generator().manual_seed(3)
        x = (torch.rand(sizes["gem"]["shape"], generator=gen) + 1e-3).requires_grad_()
        p = torch.nn.Parameter(torch.tensor([3.0]))
        grad_out = torch.randn(sizes["gem"]["shape"][:2], generator=gen)
        if name == "gem_ops":
            fn = reid_ops.gem
        elif name == "gem_eager":
            fn = gem_ref
        else:
            fn = torch.compile(gem_ref)

        def forward_backward():
            x.grad = None
            p.grad = None
            fn(x, p).backward(grad_out)

        return forward_backward
    if name.startswith("metrics"):
        s = sizes["metrics"]
        problem = ranking_problem(s["num_query"], s["num_gallery"], seed=4)
        if name == "metrics_ops":
            return lambda: reid_ops.evaluate_rank(*problem, max_rank=50)
        if name == "metrics_cython":
            evaluator = cython_evaluator()
            distmat, *ids = problem
            ids = [np.ascontiguousarray(a, dtype=np.int64) for a in ids]
            return lambda: evaluator(np.ascontiguousarray(distmat, dtype=np.float32), *ids, 50)
        if name == "metrics_torchreid_loop":
            return lambda: evaluate_rank_torchreid_loop(*problem, max_rank=50)
        return lambda: evaluate_rank_ref(*problem, max_rank=50)
    raise ValueError(f"unknown case {name!r}")


MSMT_TARGETS = {"time_s": 120.0, "peak_gb": 8.0}


def cpu_description() -> str:
    """CPU model name and the instruction-set extensions that decide the GEMM speeds (AVX-512 BF16, AMX)."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info = cpuinfo.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")))
    except (OSError, StopIteration):
        return name
    features = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    features.append("AMX" if "amx_tile" in flags else "no AMX")
    return f"{name} ({', '.join(features)})"


# (warm-up runs, timed runs; the median is reported) of the cases not run once. Short ops: warmed up (torch.compile
# compiles), median of ten. The 20x re-ranking pair: both sides three times from a fresh process, first run included,
# because one run of the ~2 s side varied by +-10 % on this project's shared CPUs (its CPU time as much as its wall).
REPEATED_CASES = {
    "gem_ops": (3, 10),
    "gem_eager": (3, 10),
    "gem_compiled": (3, 10),
    "rerank_features_ops": (0, 3),
    "rerank_features_ops_fp32": (0, 3),
    "rerank_features_classic": (0, 3),
}


def read_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def run_case(name: str, sizes: dict, k1: int, k2: int, lambda_value: float, threads: int) -> dict:
    """Child-process body: build inputs, warm up short ops, reset the high-water mark, measure."""
    torch.set_num_threads(threads)
    work = prepare_case(name, sizes, k1, k2, lambda_value)
    warmups, repeats = REPEATED_CASES.get(name, (0, 1))
    for _ in range(warmups):
        work()
    result = None
    rss_before = read_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(repeats):
        result = None  # free the previous output before the next run
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    peak_kb = read_status_kb("VmHWM")
    del result
    return {
        "time_s": float(np.median(times)),
        "times_s": times,
        "peak_mb": max(peak_kb - rss_before, 0) / 1024.0,
        "repeats": repeats,
    }


def run_cases(names: list[str], sizes: dict, k1: int, k2: int, lambda_value: float, threads: int) -> dict:
    return {name: run_case(name, sizes, k1, k2, lambda_value, threads) for name in names}


def measure(names: list[str], sizes: dict, args: argparse.Namespace, fresh_process_each: bool = True) -> dict:
    """Runs each case in a fresh spawned process (or, for the quick smoke test, all of them in one spawned process:
    the ~2 s start-up of a process importing torch would dominate tiny cases; memory figures are then indicative)."""
    groups = [[name] for name in names] if fresh_process_each else [names]
    results = {}
    for group in groups:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            args_tuple = (group, sizes, args.k1, args.k2, args.lambda_value, args.threads)
            results.update(pool.submit(run_cases, *args_tuple).result())
        for name in group:
            out = results[name]
            print(f"  {name:<28} {format_time(out['time_s']):>10}  {out['peak_mb']:9.1f} MB", flush=True)
    return results


# --------------------------------------------------------------------------------------------------------------
# Comparisons: (op, what is compared, our case, reference case, time target, memory target)
# time target = minimal reference_time / our_time; memory target = minimal reference_peak / our_peak
# --------------------------------------------------------------------------------------------------------------


def comparisons(sizes: dict) -> list[dict]:
    r, j, jd, g, m = sizes["rerank"], sizes["jaccard"], sizes["jaccard_dense"], sizes["gem"], sizes["metrics"]
    rr_size = f"Q={r['num_query']} G={r['num_gallery']} D={r['dim']}"
    return [
        dict(op="re_ranking_from_distances", size=rr_size + " (distances given)", ours="rerank_distances_ops",
             reference="rerank_distances_classic", reference_label="classic dense numpy", time_target=30.0,
             memory_target=10.0),
        dict(op="re_ranking", size=rr_size + " (from features)", ours="rerank_features_ops",
             reference="rerank_features_classic", reference_label="torch.cdist + classic dense numpy",
             time_target=20.0, memory_target=10.0),
        dict(op="re_ranking", size=rr_size + " (from features)", ours="rerank_features_ops",
             reference="rerank_features_ops_fp32", reference_label="reid_ops, fp32 candidate search (same result)",
             time_target=None, memory_target=None),
        dict(op="jaccard_graph", size=f"N={j['n']} D={j['dim']}", ours="jaccard_ops",
             reference="jaccard_knn_gemm", reference_label="fp32 kNN GEMM alone (floor)", time_target=1 / 1.5,
             memory_target=None),
        dict(op="jaccard_graph", size=f"N={jd['n']} D={jd['dim']}", ours="jaccard_ops_small",
             reference="jaccard_dense", reference_label="dense numpy Jaccard (SpCL/MMT+)", time_target=5.0,
             memory_target=None),
        dict(op="gem", size="x".join(map(str, g["shape"])) + " fwd+bwd", ours="gem_ops", reference="gem_eager",
             reference_label="unfused eager PyTorch", time_target=5.0, memory_target=None),
        dict(op="gem", size="x".join(map(str, g["shape"])) + " fwd+bwd", ours="gem_ops", reference="gem_compiled",
             reference_label="torch.compile of the same expression", time_target=1.0, memory_target=None),
        dict(op="evaluate_rank", size=f"{m['num_query']}x{m['num_gallery']}", ours="metrics_ops",
             reference="metrics_cython", reference_label="fast-reid-style Cython (argsort + loop)", time_target=1.0,
             memory_target=None),
        dict(op="evaluate_rank", size=f"{m['num_query']}x{m['num_gallery']}", ours="metrics_ops",
             reference="metrics_torchreid_loop", reference_label="per-query loop (torchreid style)", time_target=20.0,
             memory_target=None),
        dict(op="evaluate_rank", size=f"{m['num_query']}x{m['num_gallery']}", ours="metrics_ops",
             reference="metrics_loop", reference_label="per-query loop, vectorised AP (stricter)", time_target=None,
             memory_target=None),
    ]  # fmt: skip


def format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}ms" if seconds < 1 else f"{seconds:.2f}s"


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 1 minute)")
    parser.add_argument("--msmt", action="store_true", help="also run re_ranking from features at MSMT17 size")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ops.json", help="JSON output")
    parser.add_argument("--k1", type=int, default=30, help="re-ranking k1 (MMT+ test setting; field notes use 30)")
    parser.add_argument("--k2", type=int, default=6, help="re-ranking k2")
    parser.add_argument("--lambda-value", type=float, default=0.3, help="re-ranking lambda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/OpenMP threads")
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES

    rows = comparisons(sizes)
    if cython_evaluator() is None:
        print("Cython is not installed (pip install Cython): the Cython evaluate_rank reference is left out")
        rows = [row for row in rows if row["reference"] != "metrics_cython"]
    cases = list(dict.fromkeys([c for row in rows for c in (row["ours"], row["reference"])]))
    print(
        f"bench/ops.py ({'quick' if args.quick else 'full'} sizes, {args.threads} threads, {cpu_description()}); "
        "per case:",
        flush=True,
    )
    if args.msmt:
        cases.append("rerank_msmt_ops")
    measured = measure(cases, sizes, args, fresh_process_each=not args.quick)

    header = (
        f"{'op':<26} {'size':<40} {'reid_ops':>9} {'peak MB':>9}  {'reference':<42} {'ref time':>9} {'peak MB':>9}"
        f"  {'time ratio':>10} {'target':>7} {'mem ratio':>9} {'target':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        ours, ref = measured[row["ours"]], measured[row["reference"]]
        row["ours_time_s"], row["ours_peak_mb"] = ours["time_s"], ours["peak_mb"]
        row["reference_time_s"], row["reference_peak_mb"] = ref["time_s"], ref["peak_mb"]
        row["time_ratio"] = ref["time_s"] / ours["time_s"]  # > 1: reid_ops is faster
        row["memory_ratio"] = ref["peak_mb"] / max(ours["peak_mb"], 1.0)  # > 1: reid_ops needs less
        row["time_target_met"] = None if row["time_target"] is None else row["time_ratio"] >= row["time_target"]
        row["memory_target_met"] = None if row["memory_target"] is None else row["memory_ratio"] >= row["memory_target"]
        mem_target = "-" if row["memory_target"] is None else f">={row['memory_target']:g}x"
        time_target = "-" if row["time_target"] is None else f">={row['time_target']:.3g}x"
        met = row["time_target_met"] in (None, True) and row["memory_target_met"] in (None, True)
        flag = "" if met else "  MISSED"
        flag = "" if args.quick else flag  # the targets are defined at the full sizes
        print(
            f"{row['op']:<26} {row['size']:<40} {format_time(ours['time_s']):>9} {ours['peak_mb']:9.1f}  "
            f"{row['reference_label']:<42} {format_time(ref['time_s']):>9} {ref['peak_mb']:9.1f}  "
            f"{row['time_ratio']:9.2f}x {time_target:>7} "
            f"{row['memory_ratio']:8.2f}x {mem_target:>7}{flag}"
        )
    print(
        "time ratio = reference time / reid_ops time (for the kNN-GEMM row: GEMM time / jaccard_graph time, target "
        ">= 1/1.5); mem ratio = reference peak / reid_ops peak (RSS high-water delta of a fresh process)."
    )
    if args.quick:
        print("quick sizes: the targets are defined at the full sizes and are not judged here.")
    if args.msmt:
        s, res = sizes["msmt"], measured["rerank_msmt_ops"]
        met = res["time_s"] <= MSMT_TARGETS["time_s"] and res["peak_mb"] / 1024 <= MSMT_TARGETS["peak_gb"]
        flag = "" if met or args.quick else "  MISSED"
        print(
            f"re_ranking from features, Q={s['num_query']} G={s['num_gallery']} D={s['dim']}: "
            f"{res['time_s']:.1f} s, peak {res['peak_mb'] / 1024:.2f} GB above the inputs (no reference; targets "
            f"<= {MSMT_TARGETS['time_s']:g} s, <= {MSMT_TARGETS['peak_gb']:g} GB){flag}"
        )
    payload = {
        "mode": "quick" if args.quick else "full",
        "threads": args.threads,
        "machine": {
            "cpu": cpu_description(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "rerank_params": {"k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value},
        "jaccard_params": {"k1": 20, "k2": 6},
        "sizes": sizes,
        "cases": measured,
        "comparisons": rows,
        "synthetic_inputs": "random clustered L2-normalised features / random distance matrices",
    }
    write_json_atomically(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

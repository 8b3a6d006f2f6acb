"""Benchmark: adaptlab's kNN + TwoNN + GRIDE + ADP vs DADApy's own ``compute_distances`` path.

Both sides run DADApy's estimators on the same data (TwoNN, GRIDE to rank 100, kNN density at
the n1=16 ID, ADP at Z=1.6 with and without halo); they differ in where the neighbours come
from: DADApy's scikit-learn brute force, or adaptlab's tiled torch kNN (plus duplicate removal
and the ADP label guard). Repeats alternate; ``ratio = DADApy seconds / adaptlab seconds`` of
the medians and of the best runs (other jobs on a shared machine inflate single runs). Goals:
>= 1.0 on CPU with identical neighbours and IDs; >= 20 on a GPU at N=14000, D=4096, maxk=1000.
Then, on the same kind of data:

- whole-study throughput: ``layer_metrics`` on every layer of several runs (plus each run's
  data overlap with the first), at the study size (N=9000, D=576, maxk=1000 by default);
- memory: peak memory of one kNN at several block sizes, each in a fresh process.

A JSON record goes to bench/results/geometry_<device>.json.

    python bench/geometry.py                                  # CPU defaults (a few minutes)
    python bench/geometry.py --study_layers 0 --block_sizes   # the comparison only
    python bench/geometry.py --device cuda --n 14000 --dim 4096 --maxk 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dadapy import Data

from adaptlab.geometry import (
    MetricSettings,
    adp,
    dadapy_data,
    data_overlap,
    density_knn,
    gride,
    knn,
    layer_metrics,
    remove_duplicates,
    twonn,
)
from adaptlab.io import write_json
from adaptlab.telemetry import hardware, now, package_versions

RESULTS = Path(__file__).parent / "results"
Z, RANGE_MAX, SCALE, DENSITY_K = 1.6, 100, 16, 16


def synthetic_layer(
    n: int, dim: int, seed: int, classes: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """A representation-like float32 layer ``[n, dim]``: class clusters on a curved 12-d sheet.

    The examples' classes ``[n]`` are the same for every ``seed``; the seed changes the layer.
    """
    labels = np.random.default_rng(0).integers(classes, size=n)
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(classes, 12))[labels] * 2 + rng.normal(size=(n, 12))
    x = np.tanh(latent @ rng.normal(size=(12, dim)) / 3) + 0.05 * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def dadapy_path(x: np.ndarray, maxk: int) -> tuple[dict, dict]:
    """DADApy computing its own distances, then the estimators. Returns timings, results."""
    start = time.perf_counter()
    data = Data(coordinates=x, maxk=maxk, verbose=False)
    data.compute_distances(maxk=maxk)
    knn_s = time.perf_counter() - start
    id_twonn = data.compute_id_2NN()[0]
    ids = data.return_id_scaling_gride(range_max=RANGE_MAX)[0]
    data.set_id(ids[int(np.log2(SCALE))])
    data.compute_density_kNN(k=DENSITY_K)
    labels = data.compute_clustering_ADP(Z=Z, halo=False).copy()
    n_clusters = data.N_clusters
    data.compute_clustering_ADP(Z=Z, halo=True)
    total = time.perf_counter() - start
    out = {"idx": data.dist_indices, "twonn": id_twonn, "gride": ids, "labels": labels}
    return {"knn": knn_s, "total": total}, out | {"n_clusters": n_clusters}


def adaptlab_path(x: np.ndarray, maxk: int, device: str, search: str) -> tuple[dict, dict]:
    """Dedup, torch kNN, DADApy on the precomputed neighbours, guarded ADP."""
    start = time.perf_counter()
    unique = remove_duplicates(x).unique
    dist, idx = knn(unique, maxk, device=device, search=search)
    knn_s = time.perf_counter() - start
    data = dadapy_data(dist, idx)
    id_twonn = twonn(data).ids[0]
    profile = gride(data, RANGE_MAX)
    density_knn(data, profile.at(SCALE), DENSITY_K)
    clusters = adp(data, Z)
    total = time.perf_counter() - start
    out = {"idx": idx, "twonn": id_twonn, "gride": profile.ids, "labels": clusters.labels}
    return {"knn": knn_s, "total": total}, out | {"n_clusters": clusters.n_clusters}


def compare(args) -> dict:
    x, _ = synthetic_layer(args.n, args.dim, seed=1)
    x = x.astype(np.float64)
    adaptlab_path(x[:500], 50, args.device, args.search)  # warm-up (threads, CUDA context)
    theirs, ours = [], []
    for _ in range(args.repeats):
        t, ref = dadapy_path(x, args.maxk)
        theirs.append(t)
        t, res = adaptlab_path(x, args.maxk, args.device, args.search)
        ours.append(t)
    sides = (("dadapy", theirs), ("adaptlab", ours))
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("knn", "total")}
           for side, runs in sides}  # fmt: skip
    best = {side: min(r["total"] for r in runs) for side, runs in sides}
    checks = {
        "same_neighbours_fraction": float((res["idx"] == ref["idx"]).mean()),
        "twonn_rel_diff": float(abs(res["twonn"] / ref["twonn"] - 1)),
        "gride_max_rel_diff": float(np.max(np.abs(res["gride"] / ref["gride"] - 1))),
        "same_adp_labels": bool((res["labels"] == ref["labels"]).all()),
        "n_clusters": [int(ref["n_clusters"]), int(res["n_clusters"])],
        "id_twonn": float(res["twonn"]),
        "id_gride_n1_16": float(res["gride"][4]),
    }
    other = "float32" if args.search != "float32" else "float64"
    start = time.perf_counter()
    knn(x, args.maxk, device=args.device, search=other)
    alt = {f"knn_{other}_seconds": time.perf_counter() - start}
    return {
        "n": args.n,
        "dim": args.dim,
        "maxk": args.maxk,
        "repeats": args.repeats,
        "dadapy_seconds": theirs,
        "adaptlab_seconds": ours,
        "ratio_total": med["dadapy"]["total"] / med["adaptlab"]["total"],
        "ratio_knn": med["dadapy"]["knn"] / med["adaptlab"]["knn"],
        "ratio_total_best_of": best["dadapy"] / best["adaptlab"],  # robust to other jobs' load
        "goal": ">= 1.0 on CPU, >= 20 on GPU at N=14000, D=4096, maxk=1000",
        **checks,
        **alt,
    }


def study(args) -> dict:
    """layer_metrics over runs x layers, with each run's data overlap with run 0."""
    settings = MetricSettings(maxk=args.study_maxk, probe=False, block_size=args.block_size)
    per_layer, reference = [], {}
    records = []
    for run in range(args.study_runs):
        for layer in range(args.study_layers):
            x, labels = synthetic_layer(args.study_n, args.study_dim, seed=100 * run + layer)
            letters = labels % 4
            start = time.perf_counter()
            rec, neighbours = layer_metrics(
                x, {"subjects": labels, "letters": letters}, settings, device=args.device
            )
            if run == 0:
                reference[layer] = neighbours
            else:
                rec["overlap_reference"] = data_overlap(reference[layer], neighbours)
            per_layer.append(time.perf_counter() - start)
            records.append({k: rec[k] for k in ("id_gride", "n_clusters", "ari_subjects")})
    probe_s = None
    if args.study_probe:
        start = time.perf_counter()
        layer_metrics(x, {"subjects": labels}, MetricSettings(maxk=args.study_maxk))
        probe_s = time.perf_counter() - start - statistics.median(per_layer)
    x = synthetic_layer(args.study_n, args.study_dim, seed=1)[0].astype(np.float64)
    theirs, ours = [], []
    for _ in range(3):  # the same steps on both sides, alternating
        theirs.append(dadapy_path(x, args.study_maxk)[0]["total"])
        ours.append(adaptlab_path(x, args.study_maxk, args.device, args.search)[0]["total"])
    median = statistics.median(per_layer)
    return {
        "n": args.study_n,
        "dim": args.study_dim,
        "maxk": args.study_maxk,
        "runs": args.study_runs,
        "layers_per_run": args.study_layers,
        "layer_seconds": per_layer,
        "layer_seconds_median": median,
        "layers_per_hour": 3600 / median,
        "paper_study_hours": 4 * 33 * median / 3600,  # 0/1/2/5 shots x 33 layers (llama-3-8b)
        "probe_extra_seconds_one_layer": probe_s,
        "dadapy_path_seconds_one_layer": theirs,
        "adaptlab_path_seconds_one_layer": ours,  # kNN + TwoNN + GRIDE + ADP, as DADApy's path
        "ratio_one_layer": statistics.median(theirs) / statistics.median(ours),
        "ratio_one_layer_best_of": min(theirs) / min(ours),
        "layers": records,
    }


def memory(args) -> list[dict]:
    """Peak memory of one kNN per block size (0: DADApy's path), each in a fresh process."""
    out = []
    for block in [0, *args.block_sizes]:
        cmd = [sys.executable, __file__, "--memory_probe", str(block), "--device", args.device,
               "--study_n", str(args.study_n), "--study_dim", str(args.study_dim),
               "--memory_maxk", str(args.memory_maxk)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return out


def _rss_mib(field: str) -> float | None:
    """``VmRSS``/``VmHWM`` of this process from procfs (Linux), in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_probe(args) -> None:
    """Child process: peak memory added by one kNN (RSS on CPU, allocator peak on GPU)."""
    x, _ = synthetic_layer(args.study_n, args.study_dim, seed=1)
    x = x.astype(np.float64)
    device = torch.device(args.device)
    try:  # reset the peak RSS so the data generation's temporaries do not count
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_mib("VmRSS")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if args.memory_probe > 0:
        knn(x, args.memory_maxk, block_size=args.memory_probe, device=device)
    else:  # DADApy's own path, for reference
        Data(coordinates=x, maxk=args.memory_maxk, verbose=False).compute_distances()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _rss_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = peak - before
    record = {"block_size": args.memory_probe or "dadapy", "n": len(x), "dim": x.shape[1]}
    record["maxk"] = args.memory_maxk
    print(json.dumps(record | {"peak_extra_mib": round(extra, 1), "seconds": round(seconds, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="points of the comparison")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--maxk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--search", default="auto", choices=["auto", "float32", "float64"])
    parser.add_argument("--block_size", type=int, default=4096)
    parser.add_argument("--study_n", type=int, default=9000)
    parser.add_argument("--study_dim", type=int, default=576)
    parser.add_argument("--study_maxk", type=int, default=1000)
    parser.add_argument("--study_runs", type=int, default=2)
    parser.add_argument("--study_layers", type=int, default=4, help="0: skip the study")
    parser.add_argument("--study_probe", action="store_true", help="also time one probe")
    parser.add_argument("--block_sizes", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--memory_maxk", type=int, default=100)
    parser.add_argument("--memory_probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:
        memory_probe(args)
        return
    record = {"benchmark": "geometry", "device": args.device, "search": args.search}
    record["comparison"] = compare(args)
    c = record["comparison"]
    print(
        f"N={args.n} D={args.dim} maxk={args.maxk}: DADApy / adaptlab = {c['ratio_total']:.2f} "
        f"(best of {args.repeats}: {c['ratio_total_best_of']:.2f}; kNN {c['ratio_knn']:.2f}); "
        f"same neighbours {c['same_neighbours_fraction']:.6f}, "
        f"TwoNN rel diff {c['twonn_rel_diff']:.1e}, same ADP labels {c['same_adp_labels']}"
    )
    if args.study_layers:
        record["study"] = study(args)
        s = record["study"]
        print(
            f"study N={s['n']} D={s['dim']} maxk={s['maxk']}: {s['layer_seconds_median']:.2f} s "
            f"per layer, all metrics ({s['layers_per_hour']:.0f} layers/h); kNN+ID+ADP alone: "
            f"DADApy / adaptlab = {s['ratio_one_layer']:.2f} (best of 3: "
            f"{s['ratio_one_layer_best_of']:.2f})"
        )
    if args.block_sizes:
        record["memory"] = memory(args)
        for m in record["memory"]:
            print(f"block {m['block_size']}: peak +{m['peak_extra_mib']} MiB, {m['seconds']} s")
    record |= {"hardware": hardware(), "versions": package_versions(), "created": now()}
    name = RESULTS / f"geometry_{torch.device(args.device).type}.json"
    write_json(name, record)
    print(f"-> {name}")


if __name__ == "__main__":
    main()

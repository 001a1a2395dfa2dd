"""IAR codebook rearrangement (IAR paper §3.2): balanced k-means, then a nearest-neighbour order.

The codebook of a trained VQ is unordered: neighbouring indices hold unrelated codes. IAR
partitions the N codes into n clusters of exactly m = N / n codes by balanced k-means on the
l2-normalised codes, orders the codes of each cluster as a nearest-neighbour chain and renumbers
them so that cluster j holds the new indices [j*m, (j+1)*m). The result is a permutation

    mapping[old] = new,   cluster(new) = new // m,   E_new = E_old[argsort(mapping)],

so a token sequence is moved to the new numbering by `mapping[tokens]` and back by
`argsort(mapping)[tokens]`; decoding new tokens with the permuted codebook gives the same image
as decoding the old tokens with the old one.

Balanced assignment. IAR assigns greedily: (code, centre) pairs are taken in order of increasing
distance and a code joins the centre if it is still unassigned and the cluster is not full. We get
exactly that assignment without a Python loop over pairs: both sides rank each other by the same
pair distance, so the greedy assignment is the unique stable matching of codes to cluster slots,
which deferred acceptance finds in rounds of vectorised sorts (every unassigned code proposes to
its next-nearest centre; each centre keeps its m nearest proposers and rejects the rest).
16384 x 8 codes into 128 clusters, 100 iterations: about 6 s of CPU time instead of hours.

Which level of a dual tokenizer. IAR2 replaces IAR's clusters with the semantic codebook, so its
own pipeline needs no rearrangement; to run IAR's cluster loss on a dual tokenizer one rearranges
the detail codebook (the large one, 4096 codes, whose exact index is the hard part to predict).
The CLI therefore defaults to `--level detail` on dual tokenizers and `single` otherwise.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from iar2.checkpoint import load_meta, load_weights, safe_torch_load, save_weights
from iar2.cli import nonneg_int, positive_int
from iar2.config import ConfigError, to_dict
from iar2.io import atomic_path, atomic_write_json
from iar2.tokenizer.vq_model import load_vq, vq_meta

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- balanced k-means

def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances (float64, so ties are exact ties)."""
    x, c = x.double(), c.double()
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None]
    return d.clamp_min_(0.0)


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy capacity-limited assignment of N points to K clusters of `capacity` each.

    Equal to taking (point, cluster) pairs by increasing distance and accepting a pair when the
    point is free and the cluster not full; computed as deferred acceptance (see module doc).
    Each cluster holds its best `capacity` proposers in a (K, capacity) table sorted by distance;
    a free point proposes straight to its nearest cluster that could still take it (not full, or
    the point is nearer than the farthest one held), which skips hopeless proposals. With exact
    distance ties the result is still deterministic but may differ from one pair-sort order.
    dist: (N, K) with N == K * capacity. Returns (N,) cluster ids.
    """
    n_points, n_clusters = dist.shape
    if n_points != n_clusters * capacity:
        raise ValueError(f"{n_points} points do not fill {n_clusters} clusters of {capacity}")
    dist = dist.double()
    inf = float("inf")
    held_d = torch.full((n_clusters, capacity), inf, dtype=torch.float64)  # sorted ascending per cluster
    held_p = torch.full((n_clusters, capacity), -1, dtype=torch.long)
    free = torch.arange(n_points)
    rounds = 0
    while free.numel():
        rounds += 1
        # nearest cluster that would accept: its farthest held distance (inf while not full) is larger.
        # A cluster that rejected a point never accepts it later (its threshold only decreases).
        d_free = dist[free]
        choice = torch.where(d_free < held_d[:, -1], d_free, inf).argmin(1)
        d = d_free.gather(1, choice[:, None]).squeeze(1)
        # group the proposals by cluster into a (K, k) table padded with inf and merge it into the
        # held table; one stable sort: at equal distance held points stay ahead, then lower point ids
        free, order = free.sort()
        choice, d = choice[order], d[order]
        by_cluster = choice.argsort(stable=True)
        free, choice, d = free[by_cluster], choice[by_cluster], d[by_cluster]
        counts = torch.bincount(choice, minlength=n_clusters)
        slot = torch.arange(free.numel()) - (torch.cumsum(counts, 0) - counts)[choice]
        k = int(counts.max())
        prop_d = torch.full((n_clusters, k), inf, dtype=torch.float64)
        prop_p = torch.full((n_clusters, k), -1, dtype=torch.long)
        prop_d[choice, slot] = d
        prop_p[choice, slot] = free
        all_d = torch.cat([held_d, prop_d], 1)
        all_p = torch.cat([held_p, prop_p], 1)
        o = all_d.argsort(dim=1, stable=True)
        all_d, all_p = all_d.gather(1, o), all_p.gather(1, o)
        held_d, held_p = all_d[:, :capacity].contiguous(), all_p[:, :capacity].contiguous()
        rejected = all_p[:, capacity:]
        free = rejected[rejected >= 0]
    log.debug("balanced assignment: %d deferred-acceptance rounds", rounds)
    assign = torch.empty(n_points, dtype=torch.long)
    assign[held_p.reshape(-1)] = torch.arange(n_clusters).repeat_interleave(capacity)
    return assign


def cluster_inertia(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> float:
    """Sum of squared distances of each point to the mean of its cluster."""
    x = x.double()
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float64).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=n_clusters).clamp_min(1).double()
    centres = sums / counts[:, None]
    return float(((x - centres[assign]) ** 2).sum())


@dataclass
class KMeansResult:
    assign: torch.Tensor  # (N,) cluster id of each code (k-means numbering)
    centres: torch.Tensor  # (n, D) cluster means
    inertia: float  # sum of squared distances to the own centre
    iterations: int
    converged: bool  # assignments stopped changing before max_iter


def balanced_kmeans(codes: torch.Tensor, n_clusters: int, max_iter: int = 100, seed: int = 0,
                    normalize: bool = True, progress: bool = False) -> KMeansResult:
    """Balanced k-means: N codes into `n_clusters` clusters of exactly N / n_clusters.

    Centres start at distinct random codes (torch.Generator seeded by `seed`); each iteration
    assigns greedily under the capacity (`balanced_assign`) and moves centres to the means.
    Stops when the assignment no longer changes. The lowest-inertia assignment seen is returned
    (the capacity-limited greedy step is not guaranteed to decrease inertia every iteration).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, D), got shape {tuple(codes.shape)}")
    n_codes = codes.shape[0]
    if n_clusters < 1 or n_codes % n_clusters:
        raise ValueError(f"{n_codes} codes cannot be split into {n_clusters} equal clusters "
                         f"(the number of clusters must divide the codebook size)")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    m = n_codes // n_clusters
    x = codes.detach().to("cpu", torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n_codes, generator=g)[:n_clusters]].clone()

    best: KMeansResult | None = None
    assign = None
    converged = False
    it = 0
    bar = tqdm(range(max_iter), desc="balanced k-means", unit="it", disable=not progress)
    threads = torch.get_num_threads()
    # The assignment rounds work on small (n, m + k) tables: intra-op threads only add overhead
    # (measured 5x slower with 2 threads on a shared 2-core machine), so run single-threaded.
    torch.set_num_threads(1)
    try:
        for it in bar:
            new = balanced_assign(squared_distances(x, centres), m)
            if assign is not None and torch.equal(new, assign):
                converged = True
                break
            assign = new
            centres = torch.zeros_like(centres).index_add_(0, assign, x) / m
            inertia = float(((x - centres[assign]) ** 2).sum())
            bar.set_postfix(inertia=f"{inertia:.4f}")
            if best is None or inertia < best.inertia:
                best = KMeansResult(assign.clone(), centres.clone(), inertia, it + 1, False)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    iterations = it + 1  # assignment steps run (the last one found no change when converged)
    log.info("balanced k-means: %d codes -> %d x %d, %d iterations%s, inertia %.4f", n_codes, n_clusters, m,
             iterations, " (converged)" if converged else "", best.inertia)
    return KMeansResult(best.assign, best.centres, best.inertia, iterations, converged)


# ----------------------------------------------------------------------------- ordering

def nearest_neighbour_chains(points: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Order each of B groups of m points as a nearest-neighbour chain, all groups at once.

    points: (B, m, D); start: (B,) index of the first point in each group.
    Returns (B, m): positions within each group in chain order. The loop is over the m chain
    steps (each step vectorised over the groups), never over points of all groups.
    """
    b, m, _ = points.shape
    d = torch.cdist(points.double(), points.double())  # (B, m, m)
    rows = torch.arange(b)
    visited = torch.zeros(b, m, dtype=torch.bool)
    order = torch.empty(b, m, dtype=torch.long)
    cur = start.clone()
    for step in range(m):
        order[:, step] = cur
        visited[rows, cur] = True
        if step + 1 < m:
            cur = d[rows, cur].masked_fill(visited, float("inf")).argmin(1)
    return order


def _chain_start(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    # start at the point farthest from the centre: an end of the group, so the chain
    # sweeps across it instead of starting in the middle and jumping back
    return ((points - centre[:, None]) ** 2).sum(-1).argmax(1)


def mapping_from_clusters(x: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Permutation mapping[old] = new: clusters in a centre chain, codes in a chain per cluster.

    Clusters themselves are also put in nearest-neighbour order of their centres (so adjacent
    clusters are similar too; cluster-level losses do not depend on this order).
    """
    n_clusters = centres.shape[0]
    m = x.shape[0] // n_clusters
    x = x.double()
    centres = centres.double()
    # members of each cluster, by old index (deterministic)
    members = assign.argsort(stable=True).view(n_clusters, m)
    pts = x[members]  # (n, m, D)
    within = nearest_neighbour_chains(pts, _chain_start(pts, centres))
    members = torch.gather(members, 1, within)
    centre_order = nearest_neighbour_chains(centres[None], _chain_start(centres[None], centres.mean(0, keepdim=True)))[0]
    members = members[centre_order]  # new cluster j = old k-means cluster centre_order[j]
    mapping = torch.empty(x.shape[0], dtype=torch.long)
    mapping[members.reshape(-1)] = torch.arange(x.shape[0])
    return mapping


# ----------------------------------------------------------------------------- permutations

def check_mapping(mapping: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Validate a permutation of 0..N-1 (int64, 1-D) and return it contiguous."""
    if mapping.dim() != 1 or mapping.dtype != torch.long:
        raise ValueError(f"mapping must be a 1-D int64 tensor, got {mapping.dtype} {tuple(mapping.shape)}")
    if size is not None and mapping.numel() != size:
        raise ValueError(f"mapping has {mapping.numel()} entries, the codebook has {size}")
    if not torch.equal(mapping.sort().values, torch.arange(mapping.numel())):
        raise ValueError("mapping is not a permutation of 0..N-1")
    return mapping.contiguous()


def inverse(mapping: torch.Tensor) -> torch.Tensor:
    """inverse[new] = old."""
    inv = torch.empty_like(mapping)
    inv[mapping] = torch.arange(mapping.numel(), device=mapping.device)
    return inv


def to_new(tokens: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Old token ids -> rearranged ids (any shape)."""
    return mapping.to(tokens.device)[tokens]


def to_old(tokens: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Rearranged token ids -> old ids (any shape)."""
    return inverse(mapping).to(tokens.device)[tokens]


def remap_level(indices: torch.Tensor, mapping: torch.Tensor, level: str, old_to_new: bool = True) -> torch.Tensor:
    """Remap the tokens of one level: (B,h,w) for single, (B,2,h,w) [semantic, detail] for dual."""
    fn = to_new if old_to_new else to_old
    if level == "single":
        return fn(indices, mapping)
    out = indices.clone()
    k = LEVEL_INDEX[level]
    out[:, k] = fn(indices[:, k], mapping)
    return out


def permute_codebook(rows: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """E_new = E_old[argsort(mapping)]: row `new` holds the code that had index `old`."""
    return rows[inverse(mapping).to(rows.device)]


def adjacent_distance(x: torch.Tensor, mapping: torch.Tensor | None = None) -> float:
    """Mean distance between consecutive codes in index order (the objective of IAR's Eq. 1)."""
    e = x.double() if mapping is None else permute_codebook(x.double(), mapping)
    return float((e[1:] - e[:-1]).norm(dim=1).mean())


# ----------------------------------------------------------------------------- mapping files

def save_mapping(path: str | Path, mapping: torch.Tensor, info: dict) -> None:
    """Our format: `path` (.safetensors with the int64 'mapping') + `path`.json (n_clusters, ...)."""
    mapping = check_mapping(mapping)
    save_weights(path, {"mapping": mapping}, {"format": "iar2-codebook-mapping", **info})


def save_mapping_iar(path: str | Path, mapping: torch.Tensor) -> None:
    """IAR's published format: a bare int64 tensor written by torch.save (loads with weights_only)."""
    mapping = check_mapping(mapping).clone()  # own compact storage (no offset into a bigger one)
    with atomic_path(path) as tmp:
        torch.save(mapping, tmp)


def load_mapping(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, dict]:
    """Read either format; returns (mapping, info). info is {} for IAR files.

    IAR's file stores the tensor as a view at storage offset N into a 2N storage; torch.load
    restores the view and `check_mapping` makes it contiguous, so callers see a plain tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mapping file not found: {path} (write one with `iar2 rearrange`)")
    if path.suffix == ".safetensors":
        mapping = load_weights(path)["mapping"]
        info = load_meta(path) if path.with_suffix(".json").is_file() else {}
    else:
        obj = safe_torch_load(path)  # never unpickle code
        if not torch.is_tensor(obj):
            raise ValueError(f"{path}: expected a bare LongTensor (IAR format), got {type(obj).__name__}")
        mapping, info = obj.clone(), {}
    return check_mapping(mapping, size), info


# ----------------------------------------------------------------------------- rearranging a VQ

LEVEL_INDEX = {"semantic": 0, "detail": 1}


@dataclass
class Rearrangement:
    mapping: torch.Tensor  # mapping[old] = new
    n_clusters: int
    cluster_size: int
    seed: int
    iterations: int
    converged: bool
    inertia: float  # balanced k-means clusters (new // m)
    inertia_before: float  # clusters old // m (what a cluster loss would see without rearranging)
    inertia_random: float  # a random balanced partition (same seed)
    adjacent_before: float  # mean distance of index neighbours, old order
    adjacent_after: float  # ... rearranged order
    seconds: float

    def info(self) -> dict:
        d = asdict(self)
        d.pop("mapping")
        return d


def rearrange_codebook(codes: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 100,
                       normalize: bool = True, progress: bool = False) -> Rearrangement:
    """The whole IAR procedure on an (N, D) codebook; inertias are measured on the clustered
    (normalised when `normalize`) codes."""
    t0 = time.perf_counter()
    x = codes.detach().to("cpu", torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    km = balanced_kmeans(x, n_clusters, max_iter=max_iter, seed=seed, normalize=False, progress=progress)
    mapping = mapping_from_clusters(x, km.assign, km.centres)
    seconds = time.perf_counter() - t0
    m = x.shape[0] // n_clusters
    g = torch.Generator().manual_seed(seed)
    random_assign = torch.randperm(x.shape[0], generator=g) // m
    old = torch.arange(x.shape[0]) // m
    return Rearrangement(
        mapping=mapping, n_clusters=n_clusters, cluster_size=m, seed=seed, iterations=km.iterations,
        converged=km.converged, inertia=cluster_inertia(x, mapping // m, n_clusters),
        inertia_before=cluster_inertia(x, old, n_clusters),
        inertia_random=cluster_inertia(x, random_assign, n_clusters),
        adjacent_before=adjacent_distance(x), adjacent_after=adjacent_distance(x, mapping), seconds=seconds)


def default_level(model) -> str:
    return "single" if model.cfg.quantizer == "single" else "detail"


def codebook_key(model, level: str) -> str:
    """State-dict key of the stored codebook rows of `level` (the table that index lookups read)."""
    if level not in ("single", *LEVEL_INDEX):
        raise ValueError(f"level {level!r} is not allowed; allowed values: 'single', 'semantic', 'detail'")
    if model.is_dual != (level != "single"):
        raise ValueError(f"level {level!r} does not fit a {model.cfg.quantizer!r} tokenizer")
    q = model.quantize
    if level == "single":
        params = q.codebook_parameters()
    else:
        params = q.semantic_parameters() if level == "semantic" else q.detail_parameters()
    (param,) = params
    return next(k for k, p in model.named_parameters() if p is param)


def rearranged_state_dict(model, level: str, mapping: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's state dict with the codebook rows of `level` permuted (E_new = E_old[argsort(mapping)]).

    Rows are permuted as stored (raw); normalising rows commutes with permuting them, so the
    lookup vectors are permuted the same way."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = codebook_key(model, level)
    check_mapping(mapping, sd[key].shape[0])
    sd[key] = permute_codebook(sd[key], mapping)
    return sd


def write_rearranged_vq(model, out_path: str | Path, level: str, mapping: torch.Tensor,
                        extra_meta: dict | None = None, source_meta: dict | None = None) -> None:
    """Write a copy of `model` whose `level` codebook is stored in the new order (loads with `load_vq`).

    `source_meta` (the source's JSON: training config, image size, ...) is carried over, so downstream
    steps (tokenize, eval) read the same settings from the rearranged tokenizer."""
    meta = {**(source_meta or {}), "model_config": to_dict(model.cfg),
            "rearranged": {"level": level, **(extra_meta or {})}}
    save_weights(out_path, rearranged_state_dict(model, level, mapping), meta)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", required=True, help="VQ weights (.safetensors with its .json)")
    p.add_argument("--clusters", type=positive_int, default=None,
                   help="number of clusters n (must divide the codebook size); IAR: 128")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--level", choices=["single", "semantic", "detail"], default=None,
                   help="codebook to rearrange (default: single, or detail for dual tokenizers)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--max-iter", type=positive_int, default=100, help="k-means iterations at most (IAR: 100)")
    p.add_argument("--mapping", default=None,
                   help="apply an existing mapping file (ours or IAR's .pt) instead of clustering")


def run(args) -> int:
    out = Path(args.out)
    model = load_vq(args.vq)
    level = args.level or default_level(model)
    codes = model.codebook_vectors(level).detach().cpu()  # validates the level
    n_codes = codes.shape[0]
    if args.mapping:
        mapping, info = load_mapping(args.mapping, n_codes)
        n_clusters = args.clusters or info.get("n_clusters") or max(n_codes // 128, 1)  # IAR: clusters of 128
        if n_codes % n_clusters:
            raise ConfigError(f"--clusters: {n_clusters} must divide the codebook size {n_codes}")
        m = n_codes // n_clusters
        x = codes.double()
        summary = {"mapping_from": str(args.mapping), "n_clusters": n_clusters, "cluster_size": m,
                   "inertia": cluster_inertia(x, mapping // m, n_clusters),
                   "inertia_before": cluster_inertia(x, torch.arange(n_codes) // m, n_clusters),
                   "adjacent_before": adjacent_distance(x), "adjacent_after": adjacent_distance(x, mapping)}
    else:
        if not args.clusters or n_codes % args.clusters:
            raise ConfigError(f"--clusters: {args.clusters} must divide the codebook size {n_codes} "
                              "(or give --mapping to apply an existing mapping)")
        log.info("rearranging the %s codebook (%d x %d) into %d clusters", level, n_codes, codes.shape[1],
                 args.clusters)
        # Cluster the vectors the lookup uses: unit vectors for an l2-normalised quantiser (IAR's
        # setting), raw rows for the semantic-detail detail codebook (it quantises raw residuals).
        r = rearrange_codebook(codes, args.clusters, seed=args.seed, max_iter=args.max_iter,
                               normalize=False, progress=True)
        mapping, summary = r.mapping, r.info()
    summary.update(level=level, vq=str(args.vq), codebook_size=n_codes)
    save_mapping(out / "mapping.safetensors", mapping, summary)
    save_mapping_iar(out / "mapping.pt", mapping)
    write_rearranged_vq(model, out / "vq.safetensors", level, mapping,
                        {"source": str(args.vq), "n_clusters": summary["n_clusters"], "seed": args.seed},
                        source_meta=vq_meta(args.vq))
    atomic_write_json(out / "summary.json", summary)
    log.info("inertia %.4f (index order %.4f, random balanced %s); wrote %s", summary["inertia"],
             summary["inertia_before"], summary.get("inertia_random", "n/a"), out)
    return 0

"""k-nearest-neighbour classification on frozen CLS features.

Similarity is the cosine of L2-normalised features. Each query's k neighbours vote for their
class with weight ``exp(similarity / T)``; the class scores are normalised to sum to one.

Neighbour order is a strict total order: higher similarity first, and on equal similarity the
lower bank index (the sample's index in the train dataset) first. Because the order is total,
the chunked search gives exactly the neighbours of the full similarity matrix: queries are
processed ``query_chunk_size`` at a time, the bank ``bank_chunk_size`` columns at a time with a
running top-k, and under ``torchrun`` each rank holds one shard of the bank, finds its local
top-k and the shards' top-k lists are merged. Memory therefore stays at about
``query_chunk_size x bank_chunk_size`` similarities plus the bank itself (divided by the ranks).
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from . import _dist
from .features import FeatureSet, as_numpy, class_names_of, extract_features, gather_feature_set, group_ids_for
from .metrics import evaluation_report, summary_lines, youden_thresholds_of
from .plots import plot_confusion_matrix
from .results import track_results, write_results

logger = logging.getLogger("dinov2.eval")

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
_NO_INDEX = torch.iinfo(torch.long).max  # index of padding entries: sorts after every real one


# ------------------------------------------------------------------------- neighbour search
def _sort_neighbours(sims: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor, k: int):
    """Rows sorted by (-similarity, index), first ``k`` kept."""
    order = torch.argsort(indices, dim=1, stable=True)
    sims, indices, labels = sims.gather(1, order), indices.gather(1, order), labels.gather(1, order)
    order = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), indices.gather(1, order), labels.gather(1, order)


def _block_topk(sims: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sims.topk(n, dim=1)`` (values best first, column positions), in a fraction of the time on
    wide blocks: the selection, not the matmul, was most of the k-NN's overhead.

    The columns are cut into ``G`` strided groups per row (group ``j`` holds columns ``j``,
    ``j + S``, ``j + 2S``, ...); a vectorised max gives each group's best value, and the ``n``
    groups with the highest maxima hold the row's top ``n`` values: every other column is <= its
    own group's max <= the smallest selected max, and the ``n`` selected maxima are themselves
    ``n`` candidates >= that. So the top ``n`` of those ``n * G`` candidates equal the row's top
    ``n`` values, and the columns agree wherever the n-th and (n-1)-th value differ; where they
    are equal a column may be exchanged with an equal one, which is the case the caller already
    detects and redoes with a stable sort. Two small selections replace one over the whole row.
    """
    rows, width = sims.shape
    groups = 1 << max(0, round(math.log2(math.sqrt(width / max(n, 1)))))  # balances the two selections
    if groups < 4 or width < 4 * n * groups:
        return sims.topk(n, dim=1)
    stride = width // groups
    used = stride * groups  # the last width - used (< groups) columns are always candidates
    grouped = sims[:, :used].view(rows, groups, stride)  # [r, m, j] is column j + m * stride
    best_groups = grouped.amax(dim=1).topk(n, dim=1, sorted=False).indices
    # candidate [m, i] of a row is column best_groups[i] + m * stride; the tail columns follow
    candidates = grouped.gather(2, best_groups[:, None, :].expand(rows, groups, n)).flatten(1)
    if used < width:
        candidates = torch.cat([candidates, sims[:, used:]], dim=1)
    values, picked = candidates.topk(n, dim=1)
    in_groups = best_groups.gather(1, picked % n) + (picked // n) * stride
    return values, torch.where(picked < groups * n, in_groups, picked - groups * n + used)


def _chunk_topk(sims: torch.Tensor, col_indices: torch.Tensor, col_labels: torch.Tensor, k: int):
    """Top-k of a (queries x bank chunk) similarity block under the (-similarity, index) order,
    as (similarities, indices, labels) in no particular order within a row.

    ``torch.topk`` picks an arbitrary member among equal values at the k-th place. Asking for
    k + 1 values shows where that can happen (the (k+1)-th equals the k-th) without another pass
    over the block; those rows are redone with a stable full sort.
    """
    k_eff = min(k, sims.shape[1])
    values, positions = _block_topk(sims, min(k_eff + 1, sims.shape[1]))
    if values.shape[1] > k_eff:
        ambiguous = torch.nonzero(values[:, k_eff - 1] == values[:, k_eff]).flatten()
        positions = positions[:, :k_eff].contiguous()
    else:  # the whole block is kept: no choice to make
        ambiguous = positions.new_zeros(0)
    if ambiguous.numel():
        by_index = torch.argsort(col_indices, stable=True)
        block = sims[ambiguous][:, by_index]
        best = torch.argsort(block, dim=1, descending=True, stable=True)[:, :k_eff]
        positions[ambiguous] = by_index[best]
    # Left unsorted: knn_search sorts once when it merges the blocks' lists.
    found = (sims.gather(1, positions), col_indices[positions], col_labels[positions])
    if k_eff < k:  # fewer bank entries than k: pad so that every rank returns k columns
        pad = k - k_eff
        rows = sims.shape[0]
        found = (
            torch.cat([found[0], sims.new_full((rows, pad), -math.inf)], dim=1),
            torch.cat([found[1], found[1].new_full((rows, pad), _NO_INDEX)], dim=1),
            torch.cat([found[2], found[2].new_zeros((rows, pad))], dim=1),
        )
    return found


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    # The sum is finite whenever every entry is (barring overflow), and far cheaper to check.
    if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf values (check the backbone weights and the precision)")
    return F.normalize(features.float(), dim=1)


def knn_search(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    bank_indices: torch.Tensor,
    k: int,
    query_chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
    normalize: bool = True,
    group=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(similarities, bank indices, labels) of each query's ``k`` nearest bank entries, best first.

    Under torchrun ``bank`` is this rank's shard (with its dataset indices) and ``queries`` must
    be the same on every rank; every rank returns the merged result for all queries. ``group``:
    the ranks that share the bank (None: all of them).
    """
    if bank.shape[0] != bank_labels.shape[0] or bank.shape[0] != bank_indices.shape[0]:
        raise ValueError(
            f"bank has {bank.shape[0]} rows but {bank_labels.shape[0]} labels / {bank_indices.shape[0]} indices"
        )
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and bank {tuple(bank.shape)} must be (N, D) with the same D")
    if query_chunk_size < 1 or bank_chunk_size < 1 or k < 1:
        raise ValueError("k, query_chunk_size and bank_chunk_size must be >= 1")
    if normalize:
        bank = normalize_features(bank)
    bank_labels = bank_labels.to(bank.device).long()
    bank_indices = bank_indices.to(bank.device).long()
    world_size = _dist.group_size(group)
    out_sims, out_indices, out_labels = [], [], []
    for start in range(0, queries.shape[0], query_chunk_size):
        chunk = queries[start : start + query_chunk_size].to(bank.device)
        if normalize:
            chunk = normalize_features(chunk)
        best = None
        for col in range(0, bank.shape[0], bank_chunk_size):
            sims = chunk @ bank[col : col + bank_chunk_size].T
            found = _chunk_topk(
                sims, bank_indices[col : col + bank_chunk_size], bank_labels[col : col + bank_chunk_size], k
            )
            best = (
                found if best is None else _sort_neighbours(*(torch.cat([a, b], dim=1) for a, b in zip(best, found)), k)
            )
        if 0 < bank.shape[0] <= bank_chunk_size:  # a single block: its top-k is not sorted yet
            best = _sort_neighbours(*best, k)
        if best is None:  # an empty bank shard on this rank
            rows = chunk.shape[0]
            best = (
                chunk.new_full((rows, k), -math.inf),
                torch.full((rows, k), _NO_INDEX, dtype=torch.long, device=chunk.device),
                torch.zeros((rows, k), dtype=torch.long, device=chunk.device),
            )
        if world_size > 1:
            best = _merge_across_ranks(best, k, group)
        out_sims.append(best[0])
        out_indices.append(best[1])
        out_labels.append(best[2])
    if not out_sims:
        empty = queries.new_zeros((0, k))
        return empty, empty.long(), empty.long()
    return torch.cat(out_sims), torch.cat(out_indices), torch.cat(out_labels)


def _merge_across_ranks(best, k: int, group=None):
    """Each rank's (rows x k) neighbour lists -> the global top-k, identical on every rank."""
    parts = [_dist.all_gather_rows(tensor.contiguous(), group) for tensor in best]
    merged = [torch.cat(per_rank, dim=1) for per_rank in parts]
    return _sort_neighbours(*merged, k)


def vote(
    top_sims: torch.Tensor, top_labels: torch.Tensor, ks: Sequence[int], temperature: float, num_classes: int
) -> Dict[int, torch.Tensor]:
    """{k: (N, num_classes) class scores summing to 1} from neighbours sorted best first."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = torch.exp(top_sims.double() / temperature)  # exp(1/0.07) ~ 1.6e6: fine, double for the sums
    weights = torch.nan_to_num(weights, nan=0.0)  # padding entries have similarity -inf -> weight 0
    scores = {}
    for k in ks:
        if k > top_sims.shape[1]:
            raise ValueError(f"k={k} but only {top_sims.shape[1]} neighbours were searched")
        votes = torch.zeros(top_sims.shape[0], num_classes, dtype=torch.float64, device=top_sims.device)
        votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
        scores[k] = (votes / votes.sum(dim=1, keepdim=True).clamp_min(1e-300)).float()
    return scores


def knn_classify(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    bank_indices: Optional[torch.Tensor] = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: Optional[int] = None,
    query_chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
    group=None,
) -> Dict[int, torch.Tensor]:
    """{k: (num_queries, num_classes) class scores}: weighted k-NN votes (see the module docstring).

    ``bank_indices`` (default ``arange``) are the bank entries' dataset indices, used to break
    similarity ties; under torchrun they must be global (unique across the ranks' shards).
    ``group``: the ranks that share the bank (None: all; ``num_classes`` must then be given).
    """
    if bank_indices is None:
        if _dist.get_world_size() > 1:
            raise ValueError("with several processes, pass the global bank_indices of this rank's shard")
        bank_indices = torch.arange(bank.shape[0], device=bank.device)
    if num_classes is None:
        if group is not None:
            raise ValueError("knn_classify over a process group needs num_classes")
        local_max = bank_labels.max().reshape(1) if bank_labels.numel() else bank_labels.new_full((1,), -1)
        num_classes = int(_dist.all_gather_cat(local_max).max().item()) + 1
    if bank_labels.numel() and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
        raise ValueError(f"bank labels must lie in [0, {num_classes}); drop unlabelled (-1) rows first")
    top_sims, _, top_labels = knn_search(
        queries,
        bank,
        bank_labels,
        bank_indices,
        max(ks),
        query_chunk_size=query_chunk_size,
        bank_chunk_size=bank_chunk_size,
        group=group,
    )
    return vote(top_sims, top_labels, ks, temperature, num_classes)


# ------------------------------------------------------------------------------- few-shot
def sample_few_shot(labels: np.ndarray, indices: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Dataset indices of ``n_per_class`` random bank samples per class (all of a smaller class).

    Depends only on (labels, indices, n, seed), so every rank draws the same subset.
    """
    if n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1, got {n_per_class}")
    labels, indices = np.asarray(labels), np.asarray(indices)
    order = np.argsort(indices, kind="stable")
    labels, indices = labels[order], indices[order]
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = indices[labels == c]
        take = min(n_per_class, len(members))
        if take < n_per_class:
            logger.warning("few-shot: class %d has only %d samples (< %d): using all", c, len(members), n_per_class)
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------ CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Flags and ``key=value`` options of :data:`dinov2.eval.config.FLAGS` ``["knn"]``."""
    from .config import build_parser

    return build_parser(
        "knn", "dinov2 k-NN evaluation", description="k-NN classification on frozen CLS features", add_help=add_help
    )


def _bank_variants(bank: FeatureSet, options) -> List[Tuple[str, Optional[int], FeatureSet]]:
    """(name, seed, this rank's bank rows) for the full bank or each few-shot draw (``options``: cfg.knn)."""
    if options.n_per_class is None:
        return [("full", None, bank)]
    all_labels = as_numpy(_dist.all_gather_cat(bank.labels))
    all_indices = as_numpy(_dist.all_gather_cat(bank.indices))
    variants = []
    for seed in options.few_shot_seeds:
        chosen = torch.as_tensor(
            sample_few_shot(all_labels, all_indices, options.n_per_class, seed), device=bank.indices.device
        )
        variants.append(
            (f"{options.n_per_class}-shot seed {seed}", seed, bank.select(torch.isin(bank.indices, chosen)))
        )
    return variants


def run_knn(cfg: DictConfig) -> dict:
    """The evaluation of a loaded config (:func:`dinov2.eval.config.parse_config`)."""
    from .cli import check_same_classes, load_dataset, resolve_positive_class, setup_eval

    ctx = setup_eval(cfg, "knn")
    data, options = cfg.data, cfg.knn
    transform = ctx.transform()
    train = load_dataset(data.train, transform, "train")
    class_names = class_names_of(train, data.task)
    common = ctx.extraction_options(data)
    model = ctx.backbone.model
    bank = extract_features(model, train, desc="train (bank) features", **common).labelled()
    bank_size = int(_dist.all_reduce_sum(torch.tensor([len(bank)])).item())
    if bank_size == 0:
        raise SystemExit(f"--train-dataset {data.train!r} has no labelled samples")
    num_classes = len(class_names) if class_names else int(_dist.all_gather_cat(bank.labels).max().item()) + 1
    positive = resolve_positive_class(data.positive_class, class_names)

    queries = {}
    for role in ("val", "test"):
        spec = data[role]
        if spec:
            dataset = load_dataset(spec, transform, role)
            check_same_classes(class_names, class_names_of(dataset, data.task), role)
            local = extract_features(model, dataset, desc=f"{role} features", **common)
            full = gather_feature_set(local).labelled()
            if len(full) == 0:
                raise SystemExit(f"--{role}-dataset {spec!r} has no labelled samples")
            if full.labels.max() >= num_classes:
                raise SystemExit(f"--{role}-dataset has label {int(full.labels.max())} >= {num_classes} train classes")
            queries[role] = (full, group_ids_for(dataset, full.indices))

    runs = []
    for name, seed, variant in _bank_variants(bank, options):
        variant_size = int(_dist.all_reduce_sum(torch.tensor([len(variant)])).item())
        ks = sorted(k for k in set(options.nb_knn) if k <= variant_size)
        skipped = sorted(set(options.nb_knn) - set(ks))
        if skipped:
            logger.warning("%s: bank of %d samples, skipping k = %s", name, variant_size, skipped)
        if not ks:
            raise SystemExit(f"{name}: every k in {list(options.nb_knn)} exceeds the bank size {variant_size}")
        run = {"bank": name, "seed": seed, "bank_size": variant_size, "ks": ks, "skipped_ks": skipped, "splits": {}}
        for role, (full, groups) in queries.items():
            scores = knn_classify(
                full.features,
                variant.features,
                variant.labels,
                variant.indices,
                ks,
                options.temperature,
                num_classes,
                options.query_chunk_size,
                options.bank_chunk_size,
            )
            labels = as_numpy(full.labels)
            run["splits"][role] = {}
            for k in ks:
                thresholds = (
                    youden_thresholds_of(run["splits"]["val"][f"k={k}"])
                    if role == "test" and "val" in run["splits"]
                    else None
                )
                run["splits"][role][f"k={k}"] = evaluation_report(
                    labels, as_numpy(scores[k]), class_names, groups, positive, thresholds
                )
        runs.append(run)

    results = {
        "method": "knn",
        "backbone": {
            "description": ctx.backbone.description,
            "weights": str(ctx.backbone.weights_path),
            "image_size": ctx.backbone.image_size,
        },
        "datasets": {
            "train": data.train,
            "val": data.val,
            "test": data.test,
            "task": data.task,
        },
        "settings": {
            "ks": sorted(set(options.nb_knn)),
            "temperature": options.temperature,
            "n_per_class": options.n_per_class,
            "few_shot_seeds": list(options.few_shot_seeds) if options.n_per_class else None,
            "world_size": _dist.get_world_size(),
        },
        "class_names": class_names,
        "runs": runs,
    }
    if len(runs) > 1:
        results["few_shot_summary"] = _few_shot_summary(runs)
    if _dist.is_main_process():
        _write(ctx.output_dir, results, runs, class_names, options.plot_k)
        track_results(ctx.output_dir, cfg, results, "knn")  # logging.tensorboard / logging.wandb
    _dist.barrier()
    return results


def _few_shot_summary(runs: List[dict]) -> dict:
    summary = {}
    for role in runs[0]["splits"]:
        for key in runs[0]["splits"][role]:
            values = [run["splits"][role][key]["top1"] for run in runs if key in run["splits"].get(role, {})]
            summary.setdefault(role, {})[key] = {
                "top1_mean": float(np.mean(values)),
                "top1_std": float(np.std(values)),
                "runs": len(values),
            }
    return summary


def _write(output_dir, results: dict, runs: List[dict], class_names, plot_k: Optional[int]) -> None:
    lines = [f"k-NN evaluation of {results['backbone']['description']} ({results['backbone']['weights']})"]
    for run in runs:
        lines.append(f"bank: {run['bank']} ({run['bank_size']} samples), T = {results['settings']['temperature']}")
        for role, per_k in run["splits"].items():
            for key, report in per_k.items():
                lines.extend("  " + line for line in summary_lines(f"{role} {key}", report))
    for role, per_k in results.get("few_shot_summary", {}).items():
        for key, stats in per_k.items():
            lines.append(
                f"few-shot {role} {key}: top-1 {100 * stats['top1_mean']:.2f}% +- {100 * stats['top1_std']:.2f} over {stats['runs']} draws"
            )
    path = write_results(output_dir, results, lines)
    first = runs[0]
    k = plot_k if plot_k in first["ks"] else (20 if 20 in first["ks"] else first["ks"][0])
    for role, per_k in first["splits"].items():
        plot_confusion_matrix(
            per_k[f"k={k}"]["confusion_matrix"],
            output_dir / f"confusion_matrix_{role}_k{k}.png",
            class_names,
            title=f"k-NN (k={k}) on {role}",
        )
    print("\n".join(lines))
    print(f"results written to {path}")


def main(argv: Optional[Iterable[str]] = None) -> int:
    from .config import parse_config

    cfg = parse_config("knn", get_args_parser(), argv)
    return _dist.run_then_destroy(run_knn, cfg)


if __name__ == "__main__":
    raise SystemExit(main())

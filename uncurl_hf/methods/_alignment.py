"""Neuron alignment of a merge group's members to its anchor (weight matching, as in M-SMoE and Git Re-Basin).

Two experts compute the same function with their hidden neurons in any order, so averaging them neuron by neuron
only makes sense once each member's neurons are permuted onto the anchor's: the permutation maximizing the summed
similarity of matched neurons, an assignment problem solved exactly by ``scipy.optimize.linear_sum_assignment``.

At real shapes this is the most expensive step of a merge: switch-base-8's experts have 3072 neurons, so each
member costs a 3072 x 1536 x 3072 similarity product and a 3072 x 3072 assignment (about 0.5 s and 1.1 s on one
core), dozens of times per model. The members of a layer are independent problems, and SciPy's solver releases the
GIL, so the assignments are solved on a pool of ``torch.get_num_threads()`` threads while this thread computes the
next similarity products (with torch's own threads). Each result depends only on its own pair and results are
collected by pair: the permutations are identical for any number of workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.io.checks import check_finite

Permutation = list[int] | None


def neuron_features(tensors: Mapping[str, torch.Tensor], neuron_axes: Mapping[str, int]) -> torch.Tensor:
    """``[n, F]``: every tensor of one expert with its hidden-neuron axis first, flattened and concatenated.

    For Switch (``wi [n, D]``, ``wo [D, n]``) a neuron's feature is its ``wi`` row and its ``wo`` column, so
    ``F_a @ F_m.T = Wi_a Wi_m^T + Wo_a^T Wo_m`` (the weight-matching similarity of M-SMoE / Git Re-Basin).
    """
    parts = []
    for name in sorted(set(tensors) & set(neuron_axes)):  # tensors without a neuron axis (output biases) say nothing
        tensor = tensors[name].detach().float().cpu().movedim(neuron_axes[name], 0)
        parts.append(tensor.reshape(tensor.shape[0], -1))
    return torch.cat(parts, dim=1)


def neuron_similarity(anchor: torch.Tensor, member: torch.Tensor) -> np.ndarray:
    """``[n, n]`` float64 ``anchor @ member.T``: how alike anchor neuron ``i`` and member neuron ``j`` are."""
    return (anchor.double() @ member.double().T).numpy()


def best_assignment(similarity: np.ndarray) -> Permutation:
    """The permutation ``p`` maximizing ``sum_i similarity[i, p[i]]``; ``None`` when it is the identity."""
    from scipy.optimize import linear_sum_assignment  # lazy: keeps `import uncurl_hf` light

    rows, cols = linear_sum_assignment(similarity, maximize=True)
    perm = cols[np.argsort(rows)]
    if np.array_equal(perm, np.arange(len(perm))):
        return None
    return [int(i) for i in perm]


def match_neurons(anchor: torch.Tensor, member: torch.Tensor) -> Permutation:
    """Permutation ``p`` maximizing ``sum_i <anchor_i, member_p[i]>``; ``None`` when it is the identity.

    ``apply`` takes ``W[p]`` along the neuron axis, so member neuron ``p[i]`` lands on anchor neuron ``i``.
    """
    return best_assignment(neuron_similarity(anchor, member))


def alignment_workers(jobs: int) -> int:
    """Threads for ``jobs`` assignment problems: torch's thread count (the user's CPU budget), at most one per job."""
    return max(1, min(jobs, torch.get_num_threads()))


def align_groups(
    family: MoEFamily, layer: MoELayer, groups: Sequence[Sequence[int]], weights: Sequence[Sequence[float]]
) -> list[list[Permutation] | None]:
    """Per group, the permutations aligning each member to the anchor ``group[0]`` (``None`` for a singleton).

    Members with merge weight 0 contribute nothing, so they are not aligned (their permutation is ``None``). Every
    aligned expert is checked finite as it is read: the assignment solver would otherwise fail with "matrix contains
    invalid numeric entries", naming nothing.
    """

    def features(index: int) -> torch.Tensor:  # float64 once: an anchor is compared with every member of its group
        tensors = family.expert_tensors(layer, index)
        check_finite(tensors, f"layer {layer.name}, expert {index}")
        return neuron_features(tensors, family.neuron_axes).double()

    members = [[m for m in range(1, len(group)) if w[m] > 0] for group, w in zip(groups, weights)]
    solved: dict[tuple[int, int], Permutation] = {}
    workers = alignment_workers(sum(map(len, members)))
    with ThreadPoolExecutor(workers, thread_name_prefix="uncurl-align") as pool:
        pending: deque[tuple[tuple[int, int], Future[Permutation]]] = deque()
        for g, group in enumerate(groups):  # one anchor's features alive at a time, <= 2 x workers similarities
            if not members[g]:
                continue
            anchor = features(group[0])
            for m in members[g]:  # products on this thread (torch's own threads), assignments on the pool
                if len(pending) >= 2 * workers:
                    job, future = pending.popleft()
                    solved[job] = future.result()
                pending.append(((g, m), pool.submit(best_assignment, neuron_similarity(anchor, features(group[m])))))
        for job, future in pending:
            solved[job] = future.result()
    return [
        [None] + [solved.get((g, m)) for m in range(1, len(group))] if len(group) > 1 else None
        for g, group in enumerate(groups)
    ]

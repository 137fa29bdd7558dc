"""The rank layout of a world of 2N ranks: branch groups, rank pairs, image shares, stages.

Pure functions and a frozen record, no processes: every rank computes the same layout from the
same numbers.

Layout (world size 2N, N >= 1):

* branch groups: ranks ``0 .. N-1`` run the uncond branch on condition-based (CBP) steps, ranks
  ``N .. 2N-1`` the cond branch;
* pairs: pair ``p`` (``0 <= p < N``) is ranks ``(p, N + p)``, one rank of each group; in the
  "pairs" layout on several nodes, where those pairs would span nodes, the ranks are placed
  (:func:`place_pairs`) so that two ranks of one node form a pair (a placement is a permutation
  ``order`` of the ranks: slot ``i`` of the layout above is rank ``order[i]``);
* images: the B images of a step (per branch) are dealt to the N pairs in contiguous shares,
  the first ``B mod N`` pairs one image more (:func:`deal`); a pair with an empty share idles
  on CBP steps;
* stages (pipelined steps): in "pairs" layout pair ``p`` pipelines its own share over 2 stages
  (rank ``p`` stage 0, rank ``N + p`` stage 1); in "layers" layout rank ``j`` runs stage ``j`` of
  2N stages on the whole batch.

World size 2 is the single pair of the original method; world size 1 is the serial baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, WorldSizeError

#: The run layouts of a world of 2N > 2 ranks (see :func:`choose_layout`).
LAYOUTS = ("pairs", "layers")


def check_world_size(world_size: int) -> int:
    """The number of pairs N of a world of ``world_size`` ranks (0 for a world of one).

    Raises:
        WorldSizeError: an odd world size above 1 (or < 1); the message says what to launch.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise WorldSizeError(f"the world size must be a positive integer, got {world_size!r}")
    if world_size == 1:
        return 0
    if world_size % 2:
        below, above = world_size - 1, world_size + 1
        raise WorldSizeError(
            f"hybridiff_rt runs on world size 1 (serial) or 2 (one CFG branch per device), or "
            f"any even number 2N (N rank pairs); this job has {world_size} ranks. Start it with "
            f"`torchrun --nproc_per_node=2 ...` (or {below} or {above} ranks in all, e.g. "
            f"`--nnodes=... --nproc_per_node=...` multiplying to an even number).")
    return world_size // 2


def deal(num_images: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous shares of ``num_images`` rows for ``num_parts`` parts, in order.

    Returns ``[(start, stop), ...]`` (``num_parts`` entries covering ``0 .. num_images``); the
    first ``num_images % num_parts`` parts get one row more; parts beyond the rows get empty
    shares ``(num_images, num_images)``.
    """
    if num_images < 0 or num_parts < 1:
        raise ValueError(f"deal needs num_images >= 0 and num_parts >= 1, got {num_images}, "
                         f"{num_parts}")
    base, extra = divmod(num_images, num_parts)
    shares, start = [], 0
    for part in range(num_parts):
        stop = start + base + (1 if part < extra else 0)
        shares.append((start, stop))
        start = stop
    return shares


def choose_layout(preference: str, images_per_branch: int, num_pairs: int) -> str:
    """"pairs" or "layers" for a run with ``images_per_branch`` images per CFG branch.

    ``preference`` is ``HybridConfig.scale_out``: "auto" takes image pairs when every pair gets
    at least one image (``images_per_branch >= num_pairs``), else layer-wise stages; "pairs" and
    "layers" force a layout (forced pairs with fewer images than pairs leave pairs idle).
    """
    if preference not in ("auto",) + LAYOUTS:
        raise ConfigError(f"scale_out must be one of ['auto', 'pairs', 'layers'], got "
                          f"{preference!r}")
    if preference != "auto":
        return preference
    return "pairs" if images_per_branch >= num_pairs else "layers"


def place_pairs(pairs: int, nodes: Sequence[Sequence[int]] | None) -> tuple[int, ...]:
    """The rank placement of the "pairs" layout: ``order`` with slot ``i`` on rank ``order[i]``
    (slots ``0 .. N-1`` uncond, ``N .. 2N-1`` cond, pair ``p`` = slots ``(p, N + p)``).

    ``nodes``: the ranks of each node (``comm.node_groups``), or None when unknown. When every
    pair ``(p, N + p)`` already lies on one node (one node, or none known) the placement is the
    identity. Otherwise each node's ranks, in ascending order, pair up two by two (the lower rank
    uncond); a node with an odd number of ranks leaves its last rank to pair with the next such
    node's, the fewest pairs that must span nodes. Pairs are numbered by their uncond rank. A pure
    function of its input, so every rank places alike.

    Raises:
        ValueError: ``nodes`` is not a partition of the ranks ``0 .. 2N-1``.
    """
    world = 2 * pairs
    identity = tuple(range(world))
    if nodes is None:
        return identity
    node_of: dict[int, int] = {}
    for index, ranks in enumerate(nodes):
        for r in ranks:
            if r in node_of or not 0 <= int(r) < world:
                raise ValueError(f"nodes {[list(n) for n in nodes]} are not a partition of the "
                                 f"ranks 0..{world - 1}")
            node_of[int(r)] = index
    if len(node_of) != world:
        raise ValueError(f"nodes {[list(n) for n in nodes]} leave ranks of 0..{world - 1} out")
    if all(node_of[p] == node_of[pairs + p] for p in range(pairs)):
        return identity
    placed: list[tuple[int, int]] = []
    left_over: list[int] = []
    for ranks in nodes:
        ranks = sorted(int(r) for r in ranks)
        if len(ranks) % 2:
            left_over.append(ranks.pop())
        placed += [(ranks[j], ranks[j + 1]) for j in range(0, len(ranks), 2)]
    placed += [(left_over[j], left_over[j + 1]) for j in range(0, len(left_over), 2)]
    placed.sort()
    return tuple(u for u, _ in placed) + tuple(c for _, c in placed)


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in a world of ``2 * pairs`` ranks (see the module docstring).

    Attributes:
        rank: this rank (global).
        pairs: N, the number of rank pairs (world size 2N).
        order: the placement, slot ``i`` on rank ``order[i]`` (:func:`place_pairs`); empty for
            the identity (slot i is rank i).
    """

    rank: int
    pairs: int
    order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.pairs < 1 or not 0 <= self.rank < 2 * self.pairs:
            raise WorldSizeError(f"rank {self.rank} does not fit a world of {2 * self.pairs}")
        if self.order and sorted(self.order) != list(range(2 * self.pairs)):
            raise ValueError(f"order {self.order} is not a permutation of the ranks "
                             f"0..{2 * self.pairs - 1}")

    def placed(self, order: Sequence[int]) -> RankLayout:
        """This rank in the same world under placement ``order``."""
        order = tuple(int(r) for r in order)
        return RankLayout(self.rank, self.pairs, () if order == self.ranks else order)

    @property
    def world_size(self) -> int:
        return 2 * self.pairs

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of each slot (``order``; ``0 .. 2N-1`` for the identity)."""
        return self.order or tuple(range(self.world_size))

    @property
    def slot(self) -> int:
        """This rank's slot: ``0 .. N-1`` uncond, ``N .. 2N-1`` cond."""
        return self.ranks.index(self.rank)

    @property
    def branch(self) -> str:
        """"uncond" (slots 0 .. N-1) or "cond" (the rest): this rank's branch on CBP steps."""
        return "uncond" if self.slot < self.pairs else "cond"

    @property
    def pair(self) -> int:
        """Index of this rank's pair, 0 .. N-1."""
        return self.slot % self.pairs

    def pair_ranks(self, pair: int | None = None) -> tuple[int, int]:
        """``(uncond rank, cond rank)`` of ``pair`` (default: this rank's pair)."""
        pair = self.pair if pair is None else pair
        return self.ranks[pair], self.ranks[self.pairs + pair]

    def group(self, branch: str | None = None) -> tuple[int, ...]:
        """The ranks of a branch group (default: this rank's), in pair order."""
        branch = self.branch if branch is None else branch
        first = 0 if branch == "uncond" else self.pairs
        return self.ranks[first:first + self.pairs]

    def share(self, images_per_branch: int) -> tuple[int, int]:
        """``(start, stop)`` rows of the branch batch this rank runs on CBP steps."""
        return deal(images_per_branch, self.pairs)[self.pair]

    def describe(self, layout: str, images_per_branch: int) -> dict[str, Any]:
        """JSON-ready description of the run layout, for the RunReport."""
        shares = deal(images_per_branch, self.pairs)
        pairs = [list(self.pair_ranks(p)) for p in range(self.pairs)]
        stages = pairs if layout == "pairs" else [list(range(self.world_size))]
        return {
            "layout": layout,
            "world_size": self.world_size,
            "rank": self.rank,
            "branch": self.branch,
            "pair": self.pair,
            "pairs": pairs,
            # the rank of each slot (pair p = slots p and N + p; identity unless placed)
            "slot_ranks": list(self.ranks),
            "groups": {"uncond": list(self.group("uncond")), "cond": list(self.group("cond"))},
            "images_per_branch": images_per_branch,
            "shares": [list(s) for s in shares],
            # ranks that run stage 0, 1, ... of a stage chain on pipelined steps
            "stage_chains": stages,
            "idle_on_cbp_steps": sorted(r for slot, r in enumerate(self.ranks)
                                        if shares[slot % self.pairs][0]
                                        == shares[slot % self.pairs][1]),
        }

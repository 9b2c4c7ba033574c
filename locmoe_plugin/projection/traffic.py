"""Payload rows one rank sends per dispatch (a combine sends the same rows back), counted exactly as the
dispatcher's :class:`~locmoe_plugin.comm.dispatcher.TrafficCounter` counts them (``comm/plan.py``):

* pairs plans (``flat``, ``flat_fast``; Megatron's ``alltoall`` sends the same pairs): one row per
  (token, expert) pair; ``inter`` = pairs whose expert is on another node, ``intra`` = pairs whose expert
  is on another rank of this node.
* hierarchical plan (nodes > 1): ``inter`` = one row per (token, remote node it needs) - the rail hop,
  deduplicated per node; ``intra`` = the node hop: every row that reached this rank (its own tokens and
  the rail rows from the same local index on every other node), once per other local rank that holds
  one of its experts - deduplicated per rank.

Layout (Megatron's and DeepSpeed's): N nodes x R ranks, E_r = E / (N R) contiguous experts per rank,
G = R E_r experts per node. Bytes = rows x hidden x element size.

:func:`count_rows` counts a given routing; :func:`expected_rows` gives the expectation under a routing
model in closed form, from the distribution of j = the number of a token's k experts on one node:
``E[pairs to a node] = E[j]``, ``P(node needed) = P(j > 0)``, and, the j experts of a node being spread
uniformly over its G (without replacement), ``P(a given rank needed | j) = 1 - C(G - E_r, j) / C(G, j)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, comb

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class Rows:
    """Rows one rank sends per dispatch, by link: ``inter`` across nodes, ``intra`` inside its node."""

    inter: float
    intra: float


def _hypergeom(pop: int, succ: int, draws: int) -> list[float]:
    """pmf over 0..draws of successes when drawing ``draws`` of ``pop`` without replacement."""
    total = comb(pop, draws)
    return [comb(succ, j) * comb(pop - succ, draws - j) / total if draws - j <= pop - succ else 0.0
            for j in range(draws + 1)]


def node_pmfs(model: str, nodes: int, ranks_per_node: int, experts: int, k: int,
              share: float = 0.0, group_nodes: int = 1, pairs_per_copy: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(pmf of j on the token's own node, pmf of j on one given other node)``, each ``[k + 1]``.

    Routing models (each token takes k distinct experts):
      * ``"uniform"``: k of the E experts uniformly (a balanced router with no locality).
      * ``"share"``: m ~ Binomial(k, share) of them on other nodes (uniform over the (N-1) G remote
        experts), k - m on its own node (uniform over its G); m values the layout cannot hold are cut and
        the rest renormalised. The pair share is then ``share`` exactly when k <= G.
      * ``"group"``: ``group_nodes`` = M nodes drawn uniformly (what group-limited routing picks when the
        scores carry no locality), then k experts uniformly among their M G experts.
      * ``"copies"``: a router whose remote pairs travel ``pairs_per_copy`` = mu to a copy (a (token, other
        node) row of the hierarchical plan; the two integers around mu, mean mu, clipped to
        [max(1, share k / (N-1)), min(k, G)]): a share c = share k / ((N-1) mu) of the (token, other node)
        combinations carry a copy. Where (N-1) c <= 1 each crossing token reaches one other node and its
        own node keeps the rest (the "node" budget mechanism concentrates them so; on 2 nodes this is every
        router); where (N-1) c > 1 (on N > 2 nodes, more remote pairs per token than one copy carries) every
        token crosses, to (N-1) c nodes on average, and keeps k - share k pairs. Pair share ``share``
        holds in expectation. A layout whose nodes
        hold fewer than k, or fewer than share k, experts has no such router (the node price is refused
        there): the ``"share"`` model is used instead, so a sweep over node counts keeps its rows.
    """
    n, g = nodes, experts // nodes
    own, rem = np.zeros(k + 1), np.zeros(k + 1)
    if model == "uniform":
        own[:] = rem[:] = _hypergeom(experts, g, k)
    elif model == "share":
        if n == 1:
            own[k] = 1.0
            return own, rem
        pm = np.array([comb(k, m) * share**m * (1 - share) ** (k - m) for m in range(k + 1)])
        pm[[m for m in range(k + 1) if m > (n - 1) * g or k - m > g]] = 0.0
        if pm.sum() <= 0:
            raise ConfigError(f"no routing of {k} experts over {n} node(s) of {g} experts has cross-node share "
                              f"{share}: use a share in (0, 1) or more experts per node")
        pm /= pm.sum()
        for m, p in enumerate(pm):
            own[k - m] += p
            for j, q in enumerate(_hypergeom((n - 1) * g, g, m)):
                rem[j] += p * q
    elif model == "copies":
        return _concentrated_pmfs(n, g, k, share, pairs_per_copy)
    elif model == "group":
        mm = min(group_nodes, n)
        if k > mm * g:
            raise ConfigError(f"group-limited routing to {mm} node(s) of {g} experts cannot hold top-{k}: "
                              f"use --group-nodes >= {-(-k // g)}")
        inner = np.array(_hypergeom(mm * g, g, k))
        own = inner * mm / n
        own[0] += 1 - mm / n
        rem = own.copy()
    else:
        raise ConfigError(f"routing model {model!r} is not 'uniform', 'share', 'copies' or 'group'")
    return own, rem


def _concentrated_pmfs(n: int, g: int, k: int, share: float, mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``"copies"`` model of :func:`node_pmfs`."""
    own, rem = np.zeros(k + 1), np.zeros(k + 1)
    own[k] = 1.0
    if n == 1 or not share:
        rem[0] = 1.0  # nothing crosses
        return own, rem
    if mu is None or not mu >= 1.0:
        raise ConfigError(f"pairs_per_copy={mu!r}: a copy carries at least one pair; give a value >= 1")
    if k > g or share * k > g:  # no such router on this layout (the node price needs k <= G): the spread model
        return node_pmfs("share", n, 1, n * g, k, share=share)
    mu = min(max(mu, share * k / (n - 1), 1.0), float(min(k, g)))
    c = share * k / ((n - 1) * mu)  # copies per (token, other node); c <= 1 by the clip above
    lo = int(np.floor(mu))
    hi_weight = mu - lo
    rem[0] = 1.0 - c
    rem[lo] += c * (1.0 - hi_weight)
    if hi_weight > 0:
        rem[lo + 1] += c * hi_weight
    if c * (n - 1) <= 1.0:  # each crossing token reaches one other node; its own node keeps the rest
        own[k] = 1.0 - c * (n - 1)
        for j in range(1, k + 1):
            own[k - j] += (n - 1) * rem[j]
        return own, rem
    # more copies per token than one (N > 2): every token crosses, to (N - 1) c nodes on average, and its
    # own node keeps k - share k pairs (the two integers around it)
    own[k] = 0.0
    t = share * k
    t_lo = int(np.floor(t))
    own[k - t_lo] += 1.0 - (t - t_lo)
    if t > t_lo:
        own[k - t_lo - 1] += t - t_lo
    return own, rem


def _rank_hit(j_pmf: np.ndarray, g: int, e_r: int) -> float:
    """P(a given rank of a node is needed) for j experts spread uniformly over the node's g experts."""
    return float(sum(p * (1 - comb(g - e_r, j) / comb(g, j)) for j, p in enumerate(j_pmf) if p))


def expected_rows(plan: str, nodes: int, ranks_per_node: int, experts: int, k: int, tokens: int,
                  own: np.ndarray, rem: np.ndarray) -> Rows:
    """Expected rows one rank sends per dispatch under the node pmfs of :func:`node_pmfs`.

    ``plan``: ``"pairs"`` (flat / Megatron alltoall) or ``"hierarchical"`` (on one node the dispatcher
    runs the pairs plan, see ``comm.dispatcher.resolve_mode``, so this returns the pairs rows there)."""
    n, r, s = nodes, ranks_per_node, tokens
    g, e_r = experts // n, experts // (n * r)
    jj = np.arange(len(own))
    if plan == "pairs" or n == 1:
        return Rows(inter=s * (n - 1) * float(jj @ rem), intra=s * float(jj @ own) * (r - 1) / r)
    if plan != "hierarchical":
        raise ConfigError(f"plan {plan!r} is not 'pairs' or 'hierarchical'")
    inter = s * (n - 1) * (1 - float(rem[0]))
    intra = s * (r - 1) * (_rank_hit(own, g, e_r) + (n - 1) * _rank_hit(rem, g, e_r))
    return Rows(inter=inter, intra=intra)


def capacity(k: int, tokens: int, capacity_factor: float, experts: int) -> int:
    """DeepSpeed's expert capacity C = ceil(k s c_f / E), at least its ``min_capacity`` 4."""
    return max(4, ceil(k * tokens * capacity_factor / experts - 1e-9))


def padded_rows(nodes: int, ranks_per_node: int, experts: int, k: int, tokens: int, capacity_factor: float) -> Rows:
    """DeepSpeed MoE: every rank sends a full capacity buffer of C = ceil(k s c_f / E) rows to every expert
    (padding included), so the rows follow the layout, not the routing."""
    cap = capacity(k, tokens, capacity_factor, experts)
    e_r = experts // (nodes * ranks_per_node)
    return Rows(inter=(nodes - 1) * ranks_per_node * e_r * cap, intra=(ranks_per_node - 1) * e_r * cap)


def allgather_rows(nodes: int, ranks_per_node: int, tokens: int) -> Rows:
    """Megatron's ``allgather`` dispatcher: every rank all-gathers the EP group's tokens (then keeps the rows
    of its own experts) and reduce-scatters the results back, so the rows follow the layout, not the
    routing. A node must receive the (N - 1) R s rows of the other nodes through its R NICs: (N - 1) s rows
    per NIC; inside the node every rank receives the N s rows of each other local rank's rail:
    (R - 1) N s (a ring's per-rank traffic, (P - 1) s, split by link)."""
    return Rows(inter=float((nodes - 1) * tokens), intra=float((ranks_per_node - 1) * nodes * tokens))


def count_rows(expert_ids: list, nodes: int, ranks_per_node: int, experts: int) -> list[dict]:
    """Count a routing exactly. ``expert_ids[p]``: ``[s_p, k]`` int expert ids of EP rank p (-1 = dropped),
    ranks node-major (rank p on node p // R). Returns per rank ``{"pairs": Rows, "hierarchical": Rows}``
    (for nodes == 1, ``hierarchical`` is the two-stage plan's per-rank dedup, ``exact_tree=True``)."""
    p_tot = nodes * ranks_per_node
    e_r = experts // p_tot
    need = []  # [P][s_p, P] bool: token needs rank q
    pairs_to = []  # [P][P] pairs to rank q
    for ids in expert_ids:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids.reshape(-1, 1) if ids.ndim == 1 else ids
        ok = ids >= 0
        rank = np.where(ok, ids // e_r, p_tot)
        m = np.zeros((ids.shape[0], p_tot + 1), dtype=np.int64)
        np.add.at(m, (np.arange(ids.shape[0])[:, None].repeat(ids.shape[1], 1), rank), 1)
        need.append(m[:, :p_tot] > 0)
        pairs_to.append(m[:, :p_tot].sum(0))
    out = []
    for p in range(p_tot):
        a, j = divmod(p, ranks_per_node)
        node_ranks = range(a * ranks_per_node, (a + 1) * ranks_per_node)
        pr = Rows(inter=float(sum(c for q, c in enumerate(pairs_to[p]) if q // ranks_per_node != a)),
                  intra=float(sum(pairs_to[p][q] for q in node_ranks if q != p)))
        if nodes == 1:
            hr = Rows(inter=0.0, intra=float(sum(need[p][:, q].sum() for q in node_ranks if q != p)))
        else:
            node_need = need[p].reshape(-1, nodes, ranks_per_node).any(-1)  # [s, N]
            inter = float(sum(node_need[:, b].sum() for b in range(nodes) if b != a))
            # rows at p: its own tokens needing node a, and rail rank (b, j)'s tokens needing node a
            intra = 0.0
            for b in range(nodes):
                src = need[b * ranks_per_node + j]
                intra += float(sum(src[:, q].sum() for q in node_ranks if q != p))
            hr = Rows(inter=inter, intra=intra)
        out.append({"pairs": pr, "hierarchical": hr})
    return out

"""The two-stage plan's canonical positions without a sort (``canonical._arrival_offsets``): rows arrive in
blocks by source rank in an order other than ascending, tokens in order inside a block; a pair's canonical
position (local expert, source ascending, token) must be its running count in its expert's column plus the
offset. Checked against a sort of the keys on random blocks."""

import random
import types

from locmoe_plugin.comm.canonical import _arrival_offsets


def test_offsets_give_the_sorted_position_of_every_pair():
    rnd = random.Random(0)
    for case in range(40):
        sources, e_r = rnd.randint(1, 6), rnd.randint(1, 4)
        first = rnd.choice((0, e_r))  # this rank's experts: the first or the second block of ids
        arrival = rnd.sample(range(sources), rnd.randint(1, sources))  # a subset, in arrival order
        rows = []  # (source, token, local experts of the row), in arrival order
        for q in arrival:
            for token in range(rnd.randint(0, 5)):
                held = sorted(rnd.sample(range(e_r), rnd.randint(1, e_r)))
                rows.append((q, token, held))
        pairs_to_expert = [[0] * (2 * e_r) for _ in range(sources)]
        for q, _, held in rows:
            for e in held:
                pairs_to_expert[q][first + e] += 1
        counts = types.SimpleNamespace(pairs_to_expert=pairs_to_expert)
        offsets = _arrival_offsets(counts, arrival, first, e_r)
        keys = sorted((e, q, token) for q, token, held in rows for e in held)
        want = {key: pos for pos, key in enumerate(keys)}
        running = [0] * e_r
        for q, token, held in rows:
            for e in held:
                running[e] += 1  # the 1-based running count of expert e's column in arrival order
                assert running[e] + offsets[q][e] == want[(e, q, token)], (case, q, token, e)

"""data.packing: several examples in one sequence of at most max_length tokens, none attending to another.

A packed sequence carries `position_ids` restarting at 0 for each example, which transformers turns into a
mask per example (recipe/packing.py says for which attention implementations), and the first label of each
example is -100, as in transformers' DataCollatorWithFlattening: no token is predicted from the example
before it. Each example's loss is then what it is unpacked.
"""
from __future__ import annotations

from .render import IGNORE


def first_fit(lengths: list[int], capacity: int) -> list[int]:
    """The sequence each length goes into: the first one with room for it (lengths <= capacity), so the packing
    is a pure function of the examples and a resumed run draws the same sequences."""
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    # A max-tree over the sequences' free room; sequences not opened yet have all of it.
    room = [capacity] * (2 * size)
    where = []
    for n in lengths:
        node = 1
        while node < size:  # down to the leftmost sequence with room >= n
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        where.append(node - size)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return where


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Examples packed first-fit in their order into sequences {"input_ids", "labels", "position_ids"}."""
    seqs: list[list[dict]] = []
    for e, i in zip(examples, first_fit([len(e["input_ids"]) for e in examples], max_length)):
        if i == len(seqs):
            seqs.append([])
        seqs[i].append(e)
    return [{"input_ids": [t for e in seq for t in e["input_ids"]],
             "labels": [t for e in seq for t in [IGNORE, *e["labels"][1:]]],
             "position_ids": [p for e in seq for p in range(len(e["input_ids"]))]} for seq in seqs]

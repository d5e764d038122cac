"""Hold one unit of a custom Ray resource on each of N nodes until stdin closes (tests/test_cluster.py).

``python cluster_hold.py ADDRESS RESOURCE N``: joins the cluster at ADDRESS, reserves {RESOURCE: 1} on N distinct
nodes with a placement group (STRICT_SPREAD), prints ``held``, and when its stdin closes removes the group and
leaves. While it holds them, actors that need RESOURCE wait for a node: a search's workers start only when the
test lets them.
"""

from __future__ import annotations

import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group


def main(address: str, resource: str, count: int) -> None:
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    group = placement_group([{resource: 1}] * count, strategy="STRICT_SPREAD")
    ray.get(group.ready(), timeout=120)
    print("held", flush=True)
    sys.stdin.read()
    remove_placement_group(group)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

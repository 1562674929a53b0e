"""Placement-group hygiene for Train runs inside Tune trials.

Ray 2.60: a Train V2 run started from a Tune trial leaves its worker placement group behind,
both when the run ends normally and when Tune stops the trial (ray-project/ray#54305; measured
here: every finished trial kept one 1-CPU bundle, and on a 4-CPU node the third trial's Ray
Data reads waited forever). Each trial therefore removes, when its run ends, the groups its own
actor created, and before it starts, groups whose creator actor is dead (trials that Tune
killed). Both rules only touch groups that belong to no live trial, so concurrent trials are
safe. This reads the GCS placement-group table directly (``creator_actor_id`` is not in
``ray.util.placement_group_table()``); the code is internal API, pinned with ray==2.60.*.
"""

from __future__ import annotations


def _table():
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]


def remove_trial_groups(own: bool = True, orphans: bool = True) -> int:
    """Remove live placement groups created by this actor (``own``) and those whose creator
    actor has died (``orphans``), never the group this actor runs in. Returns how many."""
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, get_current_placement_group, remove_placement_group

    me = ray.get_runtime_context().get_actor_id()
    current = get_current_placement_group()
    current_hex = current.id.hex() if current is not None else None
    removed = 0
    for pg in _table():
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        if pg.placement_group_id.hex() == current_hex or not pg.creator_actor_id:
            continue  # created by a driver (e.g. Tune's trial groups), not by a trial actor
        mine = me is not None and pg.creator_actor_id.hex() == me
        if (own and mine) or (orphans and pg.creator_actor_dead):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed

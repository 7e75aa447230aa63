"""What a stage run holds at once, and whether a Ray cluster can give it.

Ray Train waits forever for workers it cannot place, so every stage checks first and
fails with what to change (exit 2) instead.
"""

from __future__ import annotations


def pieces(spec) -> list[tuple[str, int, dict[str, float], str]]:
    """``(what, how many, resources of one, the knobs that size it)`` for each kind of
    process the run places: its Ray Train workers, and RL's rollout actors."""
    s = spec.scaling
    out = [("learner worker" if spec.stage == "rl" else "Ray Train worker", s.num_workers,
            {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker if s.use_gpu else 0.0},
            "scaling.num_workers x scaling.cpus_per_worker / gpus_per_worker")]
    rollout = getattr(spec, "rollout", None)
    if rollout is not None:
        out.append(("rollout actor", rollout.num_actors,
                    {"CPU": rollout.cpus_per_actor, "GPU": rollout.gpus_per_actor},
                    "rollout.num_actors x rollout.cpus_per_actor / gpus_per_actor"))
    return out


def needs(spec) -> dict[str, float]:
    """Total CPUs and GPUs the run reserves at once."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for _, n, one, _ in pieces(spec):
        for res in total:
            total[res] += n * one[res]
    return total


def shortfall(spec, cluster: dict[str, float], largest_node: dict[str, float]) -> str | None:
    """Why the run cannot be placed on a cluster with these totals and largest node, or None."""
    parts = pieces(spec)
    how = " + ".join(knobs for _, _, _, knobs in parts)
    for res, need in needs(spec).items():
        if need > cluster.get(res, 0) + 1e-9:
            return (f"{spec.stage} needs {need:g} {res} at once ({how}) but the Ray cluster has "
                    f"{cluster.get(res, 0):g}: lower those (fractions are fine), add nodes, or set "
                    "scaling.autoscaling=true where an autoscaler adds them")
        for what, _, one, _ in parts:
            if one[res] > largest_node.get(res, 0) + 1e-9:
                return (f"one {what} needs {one[res]:g} {res} but the largest Ray node has "
                        f"{largest_node.get(res, 0):g}: lower it (fractions are fine)")
    return None


def check_cluster(spec) -> None:
    """SpecError (exit 2) when the connected Ray cluster cannot place the whole run; with
    ``scaling.autoscaling`` the run waits for the nodes an autoscaler adds instead."""
    import ray

    from raystages.spec import SpecError

    if spec.scaling.autoscaling:
        return

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = {res: max((n.get(res, 0) for n in nodes), default=0) for res in ("CPU", "GPU")}
    problem = shortfall(spec, ray.cluster_resources(), largest)
    if problem:
        raise SpecError(problem)

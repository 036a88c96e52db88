"""One host with a given set of VMs, run to KSM steady state: the unit of work of a fleet.

A fleet study places VMs on hosts and then needs, for every host, what the density search
measures for one step: memory used and saved, swap traffic, OOM kills and ksmd's CPU. This
module is that step on its own: :func:`simulate_host` boots every VM of the host (in the
given order, each one's boot writes at once, then the steady-state writers on the clock), runs
ksmd until the counters settle, and returns full-scale numbers as a plain, JSON-able dict.

``boot="staggered"`` boots the VMs one at a time instead, KSM settling after each (the density
search's steps), as a host is filled in service: a guest that writes all of its RAM at boot
(Windows zeroes it) then needs that RAM only until ksmd has merged it, not all guests' at once.
The counts of every step (swap traffic, OOM kills, scans, virtual time) are summed; an OOM kill
ends the sequence, and the VMs not booted are listed in ``not_booted``.

It goes through the density file's own validation (``vmhost.density.parse_density``) with an
as-listed mix of one entry per VM, so a host document here means exactly what it means in a
density or host config file, resolution and settle rules included, and every mistake is the
same one-line error naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hw.units import PAGE_SIZE
from vmhost.density import DensityRunner, parse_density


@dataclass
class VmSpec:
    """One VM placed on a host (the fields of a density mix entry, for one guest)."""
    name: str
    image: str                # catalog image name, or a path to an image YAML file
    memory_mib: int
    domain: str = "default"
    nosharepages: bool = False
    locked: bool = False


def host_density_doc(host_doc: dict, vms: list[VmSpec], *, resolution: int = 1, seed: int = 1,
                     settle: dict | None = None, write_period: str | int = "10s") -> dict:
    """The density document that describes this host and its VMs (no limits: a fleet host
    reports what happened; the fleet decides what is acceptable)."""
    mix = [{"image": vm.image, "memory": f"{vm.memory_mib}MiB", "count": 1, "domain": vm.domain,
            "nosharepages": vm.nosharepages, "locked": vm.locked, "name": vm.name} for vm in vms]
    density = {"mix": mix, "order": "as-listed", "max_guests": max(len(vms), 1),
               "resolution": resolution, "seed": seed, "write_period": write_period}
    if settle is not None:
        density["settle"] = settle
    return {**host_doc, "density": density}


def simulate_host(host_doc: dict, vms: list[VmSpec], *, resolution: int = 1, seed: int = 1,
                  settle: dict | None = None, write_period: str | int = "10s",
                  boot: str = "together", path: str = "<fleet>") -> dict:
    """Boot ``vms`` on the host of ``host_doc`` (``host:``, ``ksm:``, optionally ``policy:``),
    run KSM to steady state and measure (see the module docstring)."""
    doc = host_density_doc(host_doc, vms, resolution=resolution, seed=seed, settle=settle,
                           write_period=write_period)
    cfg = parse_density(doc, path)
    cfg.guest_names = [vm.name for vm in vms]
    if boot == "together":
        step = DensityRunner(cfg).run_together()
    elif boot == "staggered":
        cfg.stride = 1                  # KSM settles after every VM, as a host filled in service
        step = _staggered(DensityRunner(cfg).run(), vms)
    else:
        raise ValueError(f"boot must be together or staggered, not {boot!r}")
    step.setdefault("not_booted", [])
    step.update(ram_pages=sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE,
                oom_kills=[k["name"] for k in step["oom_kills"]],
                ksmd_cpu_s=step["ksmd_cpu_s_total"], resolution=resolution,
                vms=[asdict(vm) for vm in vms])
    for k in ("image", "mix", "guest", "memory_mib", "domain", "violations", "ok"):
        step.pop(k, None)
    return step


def _staggered(res: dict, vms: list[VmSpec]) -> dict:
    """The last step's state, with the counts of all the steps summed."""
    steps = res["steps"]
    step = dict(steps[-1])
    for k in ("swapin_pages", "swapout_pages", "full_scans"):
        step[k] = sum(s[k] for s in steps)
    step["virtual_s"] = round(sum(s["virtual_s"] for s in steps), 3)
    step["swapin_rate"] = round(step["swapin_pages"] / step["virtual_s"], 3) if step["virtual_s"] else 0.0
    step["oom_kills"] = [k for s in steps for k in s["oom_kills"]]
    booted = step["guests"]
    step["no_ksm_pages"] = res["curve"][booted - 1]["no_ksm_pages"]
    step["timeline"] = res["timeline"]
    step["policy"] = res["policy"]
    step["wall_s"] = res["wall_s"]
    step["not_booted"] = [vm.name for vm in vms[booted:]]
    return step

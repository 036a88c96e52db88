"""One host with a given set of VMs, run to KSM steady state: the unit of work of a fleet.

A fleet study places VMs on hosts and then needs, for every host, what the density search
measures for one step: memory used and saved, swap traffic, OOM kills and ksmd's CPU. This
module is that step on its own: :func:`simulate_host` boots every VM of the host (in the
given order, each one's boot writes at once, then the steady-state writers on the clock), runs
ksmd until the counters settle, and returns full-scale numbers as a plain, JSON-able dict.

It goes through the density file's own validation (``vmhost.density.parse_density``) with an
as-listed mix of one entry per VM, so a host document here means exactly what it means in a
density or host config file, resolution and settle rules included, and every mistake is the
same one-line error naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
                  path: str = "<fleet>") -> dict:
    """Boot ``vms`` on the host of ``host_doc`` (``host:``, ``ksm:``, optionally ``policy:``),
    run KSM to steady state and measure (see the module docstring)."""
    doc = host_density_doc(host_doc, vms, resolution=resolution, seed=seed, settle=settle,
                           write_period=write_period)
    cfg = parse_density(doc, path)
    cfg.guest_names = [vm.name for vm in vms]
    if not vms:
        cfg.sequence = []
    step = DensityRunner(cfg).run_together()
    step.update(ram_pages=sum(n.mem_bytes for n in cfg.host.topology.nodes) // 4096,
                oom_kills=[k["name"] for k in step["oom_kills"]],
                ksmd_cpu_s=step["ksmd_cpu_s_total"], resolution=resolution,
                vms=[asdict(vm) for vm in vms])
    for k in ("image", "mix", "guest", "memory_mib", "domain", "violations", "ok"):
        step.pop(k, None)
    return step

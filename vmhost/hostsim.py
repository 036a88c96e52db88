"""One host with a given set of VMs, run to KSM steady state: the unit of work of a fleet.

A fleet study places VMs on hosts and then needs, for every host, what the density search
measures for one step: memory used and saved, swap traffic, OOM kills and ksmd's CPU. This
module drives the density package's host stepper (``vmhost.density.stepper``) directly:
:func:`simulate_host` boots every VM of the host (in the given order, each one's boot writes
at once, then the steady-state writers on the clock), runs ksmd until the counters settle,
and returns full-scale numbers as a plain, JSON-able dict.

``boot="staggered"`` boots the VMs one at a time instead, KSM settling after each (the density
search's steps), as a host is filled in service: a guest that writes all of its RAM at boot
(Windows zeroes it) then needs that RAM only until ksmd has merged it, not all guests' at once.
The counts of every step (swap traffic, OOM kills, scans, virtual time) are summed; an OOM kill
ends the sequence, and the VMs not booted are listed in ``not_booted``.

The host document is read by ``vmhost.config.parse_host_config`` and the settle rule by
``vmhost.density.parse_settle``, so it means exactly what it means in a density or host config
file, and every mistake is the same one-line error naming the key.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from guests.resolve import expect_image
from guests.schema import fail, parse_duration_ns
from hw.units import PAGE_SIZE
from vmhost.config import parse_host_config
from vmhost.density.config import HostRun, MixEntry, parse_settle
from vmhost.density.stepper import HostStepper, StepResult

BOOTS = ("together", "staggered")


@dataclass
class VmSpec:
    """One VM placed on a host (the fields of a density mix entry, for one guest)."""
    name: str
    image: str                # catalog image name, or a path to an image YAML file
    memory_mib: int
    domain: str = "default"
    nosharepages: bool = False
    locked: bool = False


def host_run(host_doc: dict, vms: list[VmSpec], *, resolution: int = 1, seed: int = 1,
             settle: dict | None = None, write_period: str | int = "10s",
             path: str = "<fleet>") -> tuple[HostRun, list[MixEntry]]:
    """The stepper's settings for this host and one mix entry per VM (validated)."""
    hcfg = parse_host_config(host_doc, path)
    run = HostRun(path, hcfg, resolution=resolution, seed=seed,
                  write_period_ns=parse_duration_ns(write_period, path, "simulation.write_period"),
                  guest_names=[vm.name for vm in vms])
    if settle is not None:
        (run.settle_scans, run.tolerance, run.max_scans,
         run.settle_time_ns) = parse_settle(settle, path, "simulation.settle")
    entries = []
    for i, vm in enumerate(vms):
        img = expect_image(vm.image, path, f"vms[{i}].image")
        if resolution > 1 and vm.memory_mib % resolution:
            raise fail(path, "simulation.resolution",
                       f"{resolution} does not divide the memory of VM {vm.name} ({vm.memory_mib} MiB)")
        entries.append(MixEntry(i, img, vm.memory_mib, count=1, domain=vm.domain,
                                nosharepages=vm.nosharepages, locked=vm.locked, name=vm.name))
    return run, entries


def simulate_host(host_doc: dict, vms: list[VmSpec], *, resolution: int = 1, seed: int = 1,
                  settle: dict | None = None, write_period: str | int = "10s",
                  boot: str = "together", path: str = "<fleet>") -> dict:
    """Boot ``vms`` on the host of ``host_doc`` (``host:``, ``ksm:``, optionally ``policy:``),
    run KSM to steady state and measure (see the module docstring)."""
    if boot not in BOOTS:
        raise ValueError(f"boot must be together or staggered, not {boot!r}")
    wall0 = time.perf_counter()
    run, entries = host_run(host_doc, vms, resolution=resolution, seed=seed, settle=settle,
                            write_period=write_period, path=path)
    st = HostStepper(run, entries)
    st.build()
    if boot == "together":
        last = st.step(0, entries)
        steps = [last]
    else:
        # one VM at a time, KSM settling after each, as a host filled in service; an OOM
        # kill ends the sequence
        steps = []
        for i, e in enumerate(entries):
            steps.append(st.step(i, [e]))
            if steps[-1].oom_kills:
                break
        last = steps[-1]
    booted = last.guests
    facts = st.facts(entries[:booted])
    out = _record(last, steps, summed=boot == "staggered")
    out.update(no_ksm_pages=sum(f.footprint for f in facts) * st.r,
               policy=st.policy_summary(), timeline=st.timeline,
               wall_s=round(time.perf_counter() - wall0, 3),
               not_booted=[vm.name for vm in vms[booted:]],
               ram_pages=sum(n.mem_bytes for n in run.host.topology.nodes) // PAGE_SIZE,
               ksmd_cpu_s=last.ksmd_cpu_s_total, resolution=resolution, unfaithful=st.unfaithful,
               vms=[asdict(vm) for vm in vms])
    out["oom_kills"] = [k["name"] for k in out["oom_kills"]]
    return out


def _record(last: StepResult, steps: list[StepResult], summed: bool) -> dict:
    """The last step's state, with the counts of all the steps summed when ``summed``."""
    d = last.as_dict()
    for k in ("image", "mix", "guest", "memory_mib", "domain"):
        del d[k]
    if summed:
        for k in ("swapin_pages", "swapout_pages", "full_scans"):
            d[k] = sum(getattr(s, k) for s in steps)
        d["virtual_s"] = round(sum(s.virtual_s for s in steps), 3)
        d["swapin_rate"] = round(d["swapin_pages"] / d["virtual_s"], 3) if d["virtual_s"] else 0.0
        d["oom_kills"] = [k for s in steps for k in s.oom_kills]
    return d

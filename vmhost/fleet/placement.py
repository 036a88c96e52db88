"""Placing a scenario's VMs onto hosts: the three policies.

Each host has room for its model's RAM minus the reserve and minus what the kernel keeps free
(the high watermarks of the host as simulated). A new host is opened, when no open
host takes the VM, of the first model that has hosts left and room for the VM; a VM no model
can take any more is left unplaced (and reported). A policy that credits KSM must also leave
room for the boot transient, since a guest's boot writes are resident before ksmd has merged
them: with staggered boots (``simulation.boot``) a host holds its earlier guests merged plus
the new guest's boot footprint; with boots together, all of its guests' boot footprints.

- ``first-fit``: VMs in inventory order, each onto the first open host whose VMs' configured
  memory leaves room for it: what a scheduler does that ignores KSM.
- ``first-fit-ksm``: the same order and rule, but a VM is charged its configured memory minus
  the KSM savings :mod:`vmhost.fleet.estimate` predicts for it on that host (self-sharing plus
  the contents the host's VMs already hold). Untouched memory is still charged: the guest may
  use it all later; only what KSM merges is credited.
- ``sharing-aware`` (Memory Buddies, VEE 2009): VMs are grouped by (image, sharing domain), the
  largest groups first and the largest VMs first inside a group, and each VM goes to the open
  host where it shares the most (the predicted cross-VM savings), the fullest one among equals;
  the charge is first-fit-ksm's. A group thus fills a host together, and what is left of a host
  goes to the VMs that share with what it already holds (the same kernel build, packages or
  application in the same domain).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmhost.fleet.config import Scenario
from vmhost.fleet.estimate import HostEstimate, SavingsProfile, savings_profile


@dataclass
class PlacedHost:
    index: int
    model: int                                  # index into scenario.models
    capacity_pages: int                         # the model's room
    vms: list[int] = field(default_factory=list)   # indices into scenario.vms, in boot order
    configured_pages: int = 0
    charged_pages: float = 0.0                  # what the policy counted against the room
    boot_pages: float = 0.0                     # the guests' boot footprints, summed
    estimate: HostEstimate = field(default_factory=HostEstimate)


@dataclass
class Placement:
    policy: str
    hosts: list[PlacedHost]
    unplaced: list[int]                         # indices into scenario.vms


class _Packer:
    """Open hosts, the models' remaining counts, and the policy's charge for a VM on a host."""

    def __init__(self, scn: Scenario, credit_ksm: bool):
        self.scn, self.credit_ksm = scn, credit_ksm
        self.together = scn.sim.boot == "together"
        self.hosts: list[PlacedHost] = []
        self.left = {m.index: m.count for m in scn.models}
        cache: dict[tuple, SavingsProfile] = {}
        self.profiles = []
        for vm in scn.vms:
            k = (vm.image, vm.memory_mib, vm.domain, vm.nosharepages, vm.locked)
            if k not in cache:
                cache[k] = savings_profile(vm.img, vm.memory_mib, vm.domain, not vm.nosharepages, vm.locked)
            self.profiles.append(cache[k])

    def charge(self, h: PlacedHost, i: int) -> float:
        p = self.profiles[i]
        return p.pages - h.estimate.saving(p) if self.credit_ksm else p.pages

    def fits(self, h: PlacedHost, i: int) -> bool:
        charge, boot = self.charge(h, i), self.profiles[i].boot_pages
        if not self.credit_ksm:
            return h.charged_pages + charge <= h.capacity_pages     # boot <= configured
        if self.together:
            return (h.charged_pages + charge <= h.capacity_pages
                    and h.boot_pages + boot <= h.capacity_pages)
        return h.charged_pages + max(charge, boot) <= h.capacity_pages

    def put(self, h: PlacedHost, i: int) -> None:
        h.charged_pages += self.charge(h, i)
        h.configured_pages += self.profiles[i].pages
        h.boot_pages += self.profiles[i].boot_pages
        h.estimate.add(self.profiles[i])
        h.vms.append(i)

    def open(self, i: int) -> PlacedHost | None:
        for m in self.scn.models:
            if self.left[m.index] is not None and self.left[m.index] <= 0:
                continue
            h = PlacedHost(len(self.hosts), m.index, self.scn.room_pages[m.index])
            if self.fits(h, i):
                if self.left[m.index] is not None:
                    self.left[m.index] -= 1
                self.hosts.append(h)
                return h
        return None


def place(scn: Scenario) -> Placement:
    policy = scn.policy
    packer = _Packer(scn, credit_ksm=policy != "first-fit")
    unplaced = []
    for i in _order(scn) if policy == "sharing-aware" else range(len(scn.vms)):
        h = _best(packer, i) if policy == "sharing-aware" else \
            next((h for h in packer.hosts if packer.fits(h, i)), None)
        if h is None:
            h = packer.open(i)
        if h is None:
            unplaced.append(i)
        else:
            packer.put(h, i)
    return Placement(policy, packer.hosts, sorted(unplaced))


def _order(scn: Scenario) -> list[int]:
    """Groups of (image, domain, mergeable), the largest first; the largest VMs first inside."""
    groups: dict[tuple, list[int]] = {}
    for i, vm in enumerate(scn.vms):
        groups.setdefault((vm.image, vm.domain, vm.nosharepages), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: -sum(scn.vms[i].memory_mib for i in g))
    return [i for g in ordered for i in sorted(g, key=lambda i: -scn.vms[i].memory_mib)]


def _best(packer: _Packer, i: int) -> PlacedHost | None:
    """The open host that shares the most with VM ``i`` and takes it; the fullest among equals."""
    p = packer.profiles[i]
    best, best_key = None, None
    for h in packer.hosts:
        if not packer.fits(h, i):
            continue
        key = (round(h.estimate.cross_saving(p), 6), h.charged_pages / h.capacity_pages)
        if best_key is None or key > best_key:
            best, best_key = h, key
    return best

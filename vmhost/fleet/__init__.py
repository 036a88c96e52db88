"""Fleet what-if: how many hosts a VM inventory needs, under a placement policy, across a sweep.

A fleet file describes host models, a VM inventory, a placement policy, the simulation and,
optionally, a sweep::

    hosts:                                 # host models; a new host is of the first model
      - name: std                          # that has hosts left and room for the VM
        count: 100                         # hosts of this model available (default: no limit)
        host: {...}                        # exactly as in a host config file (vmhost.config)
        ksm: {...}
        policy: {name: ksmtuned}           # optional KSM tuning policy, as in a host config
    inventory:                             # any of the three sources, concatenated in this order
      vms:                                 # inline
        - {image: linux-server, memory: 4GiB, count: 8, domain: tenant-a, name: web,
           nosharepages: false, locked: false}
      generate:                            # drawn from an image mix (seeded, weighted)
        count: 60
        seed: 7
        mix:
          - {image: windows-server, memory: 8GiB, weight: 2, domain: tenant-b}
      libvirt:                             # host YAMLs written by `vmhost import libvirt`
        - {file: hv01.yaml, image: linux-server, domain: default, state: running}
    placement:
      policy: sharing-aware                # first-fit | first-fit-ksm | sharing-aware
      reserve: 5%                          # of each host's RAM kept out of placement (or a size)
    simulation:
      resolution: 64                       # simulate every host and VM at 1/N of its pages
      seed: 1
      settle: {scans: 2, tolerance: 0.001, max_scans: 30}   # or {time: 120s}
      write_period: 10s
    sweep:                                 # optional: one scenario per value
      key: placement.policy                # a dotted key path into this document
      values: [first-fit, first-fit-ksm, sharing-aware]

The modules, one job each: :mod:`~vmhost.fleet.config` reads and validates the file into
scenarios; :mod:`~vmhost.fleet.estimate` predicts a VM's KSM savings on a host from the images'
content classes; :mod:`~vmhost.fleet.placement` packs the inventory onto hosts;
:mod:`~vmhost.fleet.tasks` is the per-host simulation task and its content-addressed result
store; :mod:`~vmhost.fleet.runner` runs the tasks on Dask distributed; :mod:`~vmhost.fleet.result`
sums them up per scenario (the report directory is :mod:`vmhost.reports.fleet`).
"""

"""The host config loader: sizes with units, key paths in one-line errors, knobs via the engine."""


import pytest
import yaml

from guests.errors import InputError
from vmhost.config import load_config, parse_size
from helpers import DATA

GOOD = """
host:
  profile: linux-6.18
  thp: never
  block_size: 128MiB
  nodes:
    - {memory: 4GiB, cpus: 2}
    - {memory: 2GiB, cpus: [4, 5]}
  distance: [[10, 21], [21, 10]]
  movable_nodes: [1]
  swap:
    - {name: sda, size: 1GiB, priority: 10, read_mbps: 500, write_mbps: 400}
ksm:
  pages_to_scan: 1000
  merge_across_nodes: 0
  use_zero_pages: true
"""


def write(tmp_path, text):
    p = tmp_path / "host.yaml"
    p.write_text(text)
    return p


def test_good_config_builds_the_host(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    h = cfg.build()
    assert h.topology.node_count == 2 and h.phys.block_pages == 32768
    assert len(h.phys.blocks) == 48 and h.thp_mode == "never"
    assert h.topology.nodes[0].cpus == (0, 1) and h.topology.nodes[1].cpus == (4, 5)
    assert h.swap.areas[0].dev.capacity_pages == 262144 and h.swap.areas[0].priority == 10
    from vmhost.ksm.engine import Ksm
    ksm = Ksm(h)
    cfg.apply_ksm(ksm)
    assert ksm.knobs.merge_across_nodes == 0 and ksm.knobs.use_zero_pages


@pytest.mark.parametrize("value, expect", [("4GiB", 4 << 30), ("128 MiB", 128 << 20), ("512K", 512 << 10),
                                           (4096, 4096), ("1.5GiB", 3 << 29)])
def test_sizes(value, expect):
    assert parse_size(value, "f", "k") == expect


# (edit of GOOD, key, words of the message): a table of cases, kept as data
BAD = [((case["from"], case["to"]), case["key"], case["words"])
       for case in yaml.safe_load((DATA / "bad_host_configs.yaml").read_text())]


@pytest.mark.parametrize("edit, key, words", BAD)
def test_bad_config_one_line_with_file_key_and_reason(tmp_path, edit, key, words):
    text = GOOD.replace(*edit)
    assert text != GOOD
    p = write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and key in msg and words in msg, msg


def test_missing_nodes_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="host.nodes: missing"):
        load_config(write(tmp_path, "host: {thp: never}\n"))
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(write(tmp_path, "host: [\n"))
    with pytest.raises(InputError, match="duplicate key"):
        load_config(write(tmp_path, "host: {nodes: [{memory: 1GiB}]}\nhost: {}\n"))

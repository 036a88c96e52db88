"""The container image: made with no registry, built with no network, an example run in it.

Drives the Docker engine through the docker SDK (``tools/container.py``): starts dockerd if no
engine answers, makes the debootstrapped base image once per machine (reused afterwards),
builds the wheelhouse and the image (``network_mode="none"``), and runs an example config in a
container.  Needs root, docker.io and debootstrap (installed by .ci/run).

Cold (no base image yet) about 4 minutes on 2 cores, most of it debootstrap; warm about 1.5.
"""

from __future__ import annotations

import io
import json
import sys
import time

import docker  # noqa: F401  (the [docker] extra: without it this module fails to collect, never skips)
import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import container  # noqa: E402  (tools/container.py: tooling of the checkout, not the package)

pytestmark = pytest.mark.docker

TAG = "vmhost:test"
BASE = container.DEFAULT_BASE

# (vmhost subcommand, config in the image): switch or add the density example here
EXAMPLES = [
    pytest.param("hotremove", "/configs/hotremove-ksm.yaml", id="hotremove-ksm"),
]

_phases: dict[str, float] = {}


def _timed(name: str, fn, *args, **kwargs):
    t = time.monotonic()
    try:
        return fn(*args, **kwargs)
    finally:
        _phases[name] = _phases.get(name, 0.0) + time.monotonic() - t


@pytest.fixture(scope="module")
def client(request):
    c = _timed("engine", container.engine, start=True, timeout=60)
    yield c
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None and _phases:
        with capman.global_and_fixture_disabled():
            print("\ncontainer phases: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in _phases.items()), flush=True)
    c.close()


@pytest.fixture(scope="module")
def base_image(client):
    _, made = _timed("base image", container.make_base_image, client, BASE)
    _phases["base image (made now)" if made else "base image (reused)"] = \
        _phases.pop("base image")
    return BASE


@pytest.fixture(scope="module")
def built(client, base_image):
    info = container.python_of_image(client, base_image)
    with container.build_lock(container.SOURCE_ROOT):      # one wheelhouse per checkout
        wheels = _timed("wheelhouse", container.build_wheelhouse,
                        container.SOURCE_ROOT / "wheelhouse", python=info["python"],
                        glibc=info["glibc"], arch=client.info()["Architecture"])
        result = _timed("image build", container.build_image, client, base=base_image,
                        tag=TAG, network_mode="none")
    return result, wheels


def test_base_image_has_python_and_venv(client, base_image):
    """What lets the whole build run with no network: nothing is apt-installed in it."""
    info = container.python_of_image(client, base_image)
    assert info is not None, f"{base_image}: no python3"
    assert info == {"python": "3.11", "glibc": "2.36", "venv": True}
    labels = client.images.get(base_image).labels or {}
    assert labels.get(container.BASE_LABEL) == "debootstrap-bookworm"


def test_python_probe_of_a_base_without_python(client, base_image):
    """A base with no python3 (a public debian image) is told apart and leaves no container."""
    image, _ = client.images.build(
        fileobj=io.BytesIO(f"FROM {base_image}\nRUN rm -f /usr/bin/python3*\n".encode()),
        network_mode="none", rm=True, forcerm=True)
    try:
        assert container.python_of_image(client, image.id) is None
        assert not client.containers.list(all=True, filters={"ancestor": image.id})
    finally:
        client.images.remove(image.id, force=True)


def _probe_build(client, base: str, network_mode: str) -> tuple[list[str], str | None]:
    """Build a one-RUN Dockerfile that lists the network interfaces; returns (log, error)."""
    dockerfile = (f"FROM {base}\n"
                  "RUN echo \"interfaces: $(ls /sys/class/net | sort | tr '\\n' ' ')\"\n")
    lines, error, image_id = [], None, None
    try:
        for chunk in client.api.build(fileobj=io.BytesIO(dockerfile.encode()),
                                      network_mode=network_mode, nocache=True, rm=True,
                                      forcerm=True, decode=True):
            if "stream" in chunk:
                lines += chunk["stream"].splitlines()
            if "error" in chunk:
                error = chunk["error"]
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    finally:
        if image_id:
            client.images.remove(image_id, force=True)
    return lines, error


def test_build_with_network_none_has_no_network(client, base_image):
    """The legacy builder honours network_mode="none": a RUN step sees only loopback (and
    with the default network it sees more), so a build that passes with it needs no network."""
    offline, err = _probe_build(client, base_image, "none")
    assert err is None, err
    assert [ln for ln in offline if ln.startswith("interfaces:")] == ["interfaces: lo "]
    online, err = _probe_build(client, base_image, "default")
    assert err is None, err
    seen = [ln for ln in online if ln.startswith("interfaces:")]
    assert len(seen) == 1 and seen[0] != "interfaces: lo ", seen


def test_image_built_offline_from_the_wheelhouse(client, built):
    result, wheels = built
    assert result.network_mode == "none"
    names = {w.name.split("-")[0].lower() for w in wheels}
    assert {"vmhost", "numpy", "numba", "llvmlite", "pyyaml", "mmh3"} <= names
    installed = [ln for ln in result.log if ln.startswith("Successfully installed")]
    assert len(installed) == 1 and "vmhost-" in installed[0], result.log[-10:]
    # pip installed everything from the wheelhouse: it never looked at an index
    assert any(ln.startswith("Looking in links: /wheelhouse") for ln in result.log)
    assert not any("Looking in indexes" in ln for ln in result.log)
    cfg = result.image.attrs["Config"]
    assert cfg["Entrypoint"] == ["/opt/vmhost/bin/vmhost"]
    labels = cfg.get("Labels") or {}
    assert labels.get(container.IMAGE_LABEL) == "vmhost"
    assert labels.get(container.BUILD_STAGE_LABEL) is None
    # the wheelhouse stayed in the throw-away stage; the configs are in /configs
    out = client.containers.run(TAG, ["-c", "test ! -e /wheelhouse && ls /configs"],
                                entrypoint=["/bin/sh"], network_mode="none", remove=True)
    assert "hotremove-ksm.yaml" in out.decode().split()


def test_build_context_is_dockerfile_configs_and_wheels(built):
    files = container.context_files(container.SOURCE_ROOT)
    tops = {f.split("/")[0] for f in files}
    assert tops <= {"Dockerfile", ".dockerignore", "configs", "wheelhouse"}, sorted(tops)
    assert "Dockerfile" in files and "configs/hotremove-ksm.yaml" in files
    assert any(f.startswith("wheelhouse/vmhost-") and f.endswith(".whl") for f in files)
    assert not any(f.endswith(".py") for f in files)


@pytest.mark.parametrize(("command", "config"), EXAMPLES)
def test_example_runs_in_container(client, built, command, config):
    res = _timed(f"run {config}", container.run, client, TAG, [command, config, "--json"],
                 network_mode="none", timeout=300)
    assert res.status == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["scenario"] == config
    assert result["content_unchanged"] is True          # the content check passed
    assert result["problems"] == []
    assert all(step["check"]["ok"] for step in result["steps"]), result["steps"]
    offline = [step for step in result["steps"] if step["kind"] == "offline"]
    assert offline, "no offline step"
    for step in offline:                                # every offline succeeded
        assert step["blocks"], step
        for blk in step["blocks"]:
            assert blk["ok"] is True and blk["errno"] is None, blk
    assert result["vmstat"]["blocks_offlined"] == sum(len(b["blocks"])
                                                      for s in offline for b in s["blocks"])
    assert result["vmstat"]["pgmigrate_fail"] == 0
    assert not result["oom_kills"]
    assert not client.containers.list(all=True, filters={"ancestor": TAG})


def test_cli_rejects_a_bad_image_name(capsys):
    with pytest.raises(SystemExit) as exc:
        container.main(["build", "--tag", "bad name"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("container: ") and "not an image name" in err and err.count("\n") == 1


def test_density_example_runs_in_container(client, built):
    """The density example gives the same answer in the image as on this host."""
    config = "configs/density-tiny.yaml"
    res = _timed(f"run /{config}", container.run, client, TAG, ["density", f"/{config}", "--json"],
                 network_mode="none", timeout=300)
    assert res.status == 0, res.stderr[-2000:]
    inside = json.loads(res.stdout)
    from vmhost.cli import main
    import contextlib
    import io as _io
    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["density", config, "--json", "--quiet"]) == 0
    here = json.loads(out.getvalue())
    assert inside["vms_per_host"] == here["vms_per_host"]
    assert inside["vms_per_host"]["ksm"] >= inside["vms_per_host"]["no_ksm"]
    assert not client.containers.list(all=True, filters={"ancestor": TAG})

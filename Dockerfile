# vmhost in a container: the `vmhost` CLI as ENTRYPOINT, the example configs in /configs.
#
# The build installs vmhost from a wheelhouse prepared OUTSIDE the build (pip cannot reach
# the package index from inside a build here, and an air-gapped site has no index at all):
#
#   python3 tools/container.py build         # all of it: base image, wheelhouse, image
#
# or by hand, from the repository root (legacy builder; no BuildKit needed):
#
#   pip wheel . --no-deps -w wheelhouse
#   pip download wheelhouse/vmhost-*.whl -d wheelhouse --only-binary=:all: \
#       --python-version 3.11 --implementation cp --abi cp311 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
#   (pip 23 does not expand a manylinux_2_36 tag to older ones: name each one the wheels
#   use, up to the base's glibc, 2.36 on bookworm; tools/container.py lists them all)
#   docker build --network none --build-arg BASE=vmhost-base:bookworm -t vmhost .
#   docker run --rm --network none vmhost hotremove /configs/hotremove-ksm.yaml --json
#
# BASE is any image with a Debian userland or a Python >= 3.11:
#   - vmhost-base:bookworm (the default) is made locally, with no registry, by
#     `debootstrap --variant=minbase --include=python3,python3-venv bookworm DIR` and
#     `tar -C DIR -c . | docker import - vmhost-base:bookworm` (tools/container.py does it).
#     It already has python3 and venv, so the whole build runs with `--network none`.
#   - a public python:3.11-slim has Python and venv too (build the wheelhouse for its
#     Python version); a public debian:bookworm gets python3 from apt, which needs the
#     build's network (drop `--network none`).
ARG BASE=vmhost-base:bookworm

FROM ${BASE} AS runtime
ENV LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# (Debian ships ensurepip, which venv needs, in python3-venv; python.org builds have it anyway)
RUN if python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        echo "python3 with venv is in the base image"; \
    else \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
               python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Install into a venv in a throw-away stage, so that the wheelhouse is in no layer of the image.
FROM runtime AS build
LABEL org.vmhost.stage=build
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/vmhost \
    && /opt/vmhost/bin/python -m pip install --no-index --find-links /wheelhouse \
           --no-cache-dir --disable-pip-version-check vmhost \
    && /opt/vmhost/bin/vmhost --help >/dev/null

FROM runtime
LABEL org.vmhost.image=vmhost
COPY --from=build /opt/vmhost /opt/vmhost
COPY configs/ /configs/
# numba's on-disk cache of compiled functions: writable whatever user runs the container
ENV PATH=/opt/vmhost/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    NUMBA_CACHE_DIR=/tmp/numba-cache
WORKDIR /work
ENTRYPOINT ["/opt/vmhost/bin/vmhost"]
CMD ["--help"]

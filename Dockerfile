# Container images of cvmfs-syncd:
#   target "stratum0" (the default): a CernVM-FS stratum 0 (cvmfs, cvmfs-server, Apache)
#                                    publishing with cvmfs-syncd; see docker/entrypoint.sh
#   target "client":                 a CernVM-FS client that mounts the repository
# Run them with docker-compose.yml; docs/operations.md explains the stack.

# The CernVM-FS version the daemon's behaviour was checked against (2.12.0); the apt
# repository names Debian 12 builds "<version>~1+debian12".
ARG CVMFS_VERSION=2.12.0
ARG CVMFS_DEB_SUFFIX=~1+debian12
# The release package only installs CERN's apt source and signing keys; the CernVM-FS
# packages themselves are pinned by CVMFS_VERSION above.
ARG CVMFS_RELEASE_DEB=https://cvmrepo.s3.cern.ch/cvmrepo/apt/cvmfs-release-latest_all.deb

# ---------------------------------------------------------------------------------------
FROM debian:12.8-slim AS cvmfs-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG CVMFS_VERSION
ARG CVMFS_DEB_SUFFIX
ARG CVMFS_RELEASE_DEB
# Debian's own packages follow the point release of the pinned base image; pinning them
# one by one would break the build at every security update, so only CernVM-FS is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl \
    && curl -fsSL -o /tmp/cvmfs-release.deb "${CVMFS_RELEASE_DEB}" \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        /tmp/cvmfs-release.deb \
    && rm -f /tmp/cvmfs-release.deb \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "cvmfs=${CVMFS_VERSION}${CVMFS_DEB_SUFFIX}" \
        cvmfs-config-none \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------
# Builds the virtual environment on the same Python (Debian 12: 3.11) as the final image,
# so that build tools and the source tree stay out of it.
FROM debian:12.8-slim AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's Python follows the base image's point release, as above; it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY cvmfs_syncd /src/cvmfs_syncd
RUN python3 -m venv /opt/cvmfs-syncd \
    && /opt/cvmfs-syncd/bin/python -m pip install --no-cache-dir /src

# ---------------------------------------------------------------------------------------
FROM cvmfs-base AS client
COPY docker/client-entrypoint.sh /usr/local/sbin/cvmfs-client-entrypoint
ENTRYPOINT ["/usr/local/sbin/cvmfs-client-entrypoint"]

# ---------------------------------------------------------------------------------------
FROM cvmfs-base AS stratum0
ARG CVMFS_VERSION
ARG CVMFS_DEB_SUFFIX
# Same reason as above for leaving Debian's packages unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "cvmfs-server=${CVMFS_VERSION}${CVMFS_DEB_SUFFIX}" \
        apache2 lsof procps python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/cvmfs-syncd /opt/cvmfs-syncd
COPY docker/cvmfs-syncd.toml.in /usr/local/share/cvmfs-syncd/cvmfs-syncd.toml.in
COPY docker/entrypoint.sh /usr/local/sbin/cvmfs-syncd-entrypoint
ENV PATH=/opt/cvmfs-syncd/bin:$PATH \
    PYTHONFAULTHANDLER=1
# keys and daemon state must outlive the container; the spool and local storage must not
# sit on the image's overlay file system, which cannot be an overlayfs upper directory.
VOLUME ["/etc/cvmfs/keys", "/var/lib/cvmfs-syncd", "/var/spool/cvmfs", "/srv/cvmfs"]
# 9477: cvmfs-syncd metrics and health; 80: Apache, serving local-storage repositories.
EXPOSE 9477 80
# The health endpoint fails when a lane is stalled beyond [daemon] stall_seconds; curl -f
# turns an HTTP error into a non-zero exit, which Docker counts as unhealthy. The start
# period covers creating or importing the repository.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9477/healthz"]
ENTRYPOINT ["/usr/local/sbin/cvmfs-syncd-entrypoint"]

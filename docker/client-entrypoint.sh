#!/bin/bash
# Container entrypoint of the CernVM-FS client used to try the repository out.
#
# It installs the public key and client configuration the stratum 0 published into the
# shared directory, mounts the repository on /cvmfs/<name> and stays in the foreground
# until it is stopped, then unmounts. Look at the repository with
#   docker compose exec client ls -l /cvmfs/<name>
#
# Environment: CVMFS_REPOSITORY (required); CVMFS_SYNCD_PUBLIC_DIR [/srv/cvmfs-public];
# CVMFS_CLIENT_WAIT_SECONDS [300]: how long to wait for the published files.

set -euo pipefail

log() {
    printf 'cvmfs-client-entrypoint: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

REPO=${CVMFS_REPOSITORY:-}
PUBLIC_DIR=${CVMFS_SYNCD_PUBLIC_DIR:-/srv/cvmfs-public}
WAIT_SECONDS=${CVMFS_CLIENT_WAIT_SECONDS:-300}
[ -n "$REPO" ] || die "CVMFS_REPOSITORY is not set"
[[ $WAIT_SECONDS =~ ^[0-9]+$ ]] || die "CVMFS_CLIENT_WAIT_SECONDS must be a number of seconds"

# The stratum 0 publishes both files once the repository exists.
waited=0
until [ -f "$PUBLIC_DIR/$REPO.pub" ] && [ -f "$PUBLIC_DIR/$REPO.conf" ]; do
    [ "$waited" -lt "$WAIT_SECONDS" ] || die "$PUBLIC_DIR/$REPO.pub and .conf did not appear"
    sleep 2
    waited=$((waited + 2))
done

install -D -m 0644 "$PUBLIC_DIR/$REPO.pub" "/etc/cvmfs/keys/$REPO.pub"
install -D -m 0644 "$PUBLIC_DIR/$REPO.conf" "/etc/cvmfs/config.d/$REPO.conf"
# No site proxy in this stack: the client talks to the storage directly.
printf 'CVMFS_HTTP_PROXY=DIRECT\nCVMFS_QUOTA_LIMIT=2000\n' >/etc/cvmfs/default.local

mkdir -p "/cvmfs/$REPO"
mount -t cvmfs "$REPO" "/cvmfs/$REPO" || die "mounting /cvmfs/$REPO failed"
log "mounted /cvmfs/$REPO"

unmount() {
    umount "/cvmfs/$REPO" || log "unmounting /cvmfs/$REPO failed"
    exit 0
}
trap unmount INT TERM

# Wait in the shell, not in a foreground child, so that the trap runs at once.
sleep infinity &
wait "$!"

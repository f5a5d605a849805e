#!/bin/sh
# Builds a minimal Debian bookworm image from Debian's own mirror with
# debootstrap and imports it into the local Docker engine, for machines with no
# container registry. Run as root (debootstrap needs it).
#
#   docker/make-base.sh [IMAGE] [MIRROR]   # default latssiam-base:bookworm, http://deb.debian.org/debian
#
# Then build with --build-arg RUNTIME=IMAGE (gateway) or --build-arg BASE=IMAGE
# (postfix, ngircd); see docker/README.md.
set -eu
image=${1:-latssiam-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null 2>&1 || {
    echo "make-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}
dir=$(mktemp -d /var/tmp/latssiam-base.XXXXXX)
trap 'rm -rf "$dir"' EXIT INT TERM
debootstrap --variant=minbase bookworm "$dir" "$mirror"
cat > "$dir/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# What the official debian:*-slim images also leave out or switch off.
cat > "$dir/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
mkdir -p "$dir/etc/dpkg/dpkg.cfg.d"
cat > "$dir/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
echo 'APT::Install-Recommends "false";' > "$dir/etc/apt/apt.conf.d/docker-no-recommends"
printf '#!/bin/sh\nexit 101\n' > "$dir/usr/sbin/policy-rc.d"
chmod 755 "$dir/usr/sbin/policy-rc.d"
rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/var/log/* "$dir"/tmp/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
: > "$dir/etc/machine-id" 2>/dev/null || true
tar -C "$dir" --numeric-owner -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8' \
    - "$image"
echo "imported $image"

#!/bin/sh
# Make sure the Dockerfiles' base image exists, building a stand-in for it when no registry answers.
#
#   sh docker/build-standin-base.sh [TAG]        (default TAG: python:3.11-slim, the Dockerfiles' ARG)
#
# Nothing to do when the engine already has TAG, or can pull it. Otherwise (an offline machine, as CI
# is) a Debian bookworm root file system (Python 3.11, like python:3.11-slim) is made with debootstrap
# from the mirror in this host's apt sources and imported as TAG. It carries this host's CA bundle and
# pip index settings, so `pip install` inside a build reaches the package index the way the host does.
# Needs root, debootstrap and a Docker engine; takes about a minute.
set -eu

tag=${1:-python:3.11-slim}
say() { echo "[build-standin-base] $*" >&2; }

if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
if timeout 60 docker pull -q "$tag" >/dev/null 2>&1; then
  say "pulled $tag"; exit 0
fi
command -v debootstrap >/dev/null || { say "no $tag and no debootstrap to make a stand-in (apt-get install debootstrap)"; exit 2; }

# The first Debian mirror the host's apt uses (deb822 .sources or one-line .list files).
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
             | awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}')
fi
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
say "no $tag: building a stand-in from Debian bookworm ($mirror)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null

ln -sf python3 "$root/usr/bin/python"  # the Dockerfiles run `python -m venv`, as python:3.11-slim has it
# The host's CA bundle (it may trust a proxy's authority that Debian's bundle does not) and its pip
# index settings, read here rather than written into the project.
host_bundle=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -f "$host_bundle" ]; then
  cp "$host_bundle" "$root/etc/ssl/certs/host-ca-bundle.crt"
else
  cp "$root/etc/ssl/certs/ca-certificates.crt" "$root/etc/ssl/certs/host-ca-bundle.crt"
fi
index_url=${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/host-ca-bundle.crt"
  case $index_url in http*) echo "index-url = $index_url" ;; esac
} > "$root/etc/pip.conf"
# What Debian's slim images leave out too: package caches, documentation, translations.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
say "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1 / 1e6}'))"

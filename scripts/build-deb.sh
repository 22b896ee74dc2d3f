#!/usr/bin/env bash
# `make deb`: dist/bbprobe_<version>_<arch>.deb, built by Debian's own tooling
# (dpkg-buildpackage with debhelper; the packaging is scripts/deb/, copied in as debian/).
#
# The Python dependencies travel inside the package, privately in /usr/lib/bbprobe, as the
# exact versions of the tested venv (pip freeze -> constraints.txt): Debian 12's
# python3-aiohttp (3.8) and python3-icmplib (2.1) are older than bbprobe needs, and
# influxdb-client is not packaged. Only wheels are copied, so DEB_ARCH=arm64 or armhf
# builds a probe's package on an amd64 machine.
#
#   DEB_ARCH     target architecture (default: this machine's)
#   DEB_VERSION  package version (default: the Python package's version)
#   DEB_PYTHON   the tested venv's python: pip, and the versions to pin (default:
#                .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# Absolute, but not resolved: a venv's python is a symlink to the base interpreter, and
# only through the link does it see the venv (whose versions are the ones to pin).
PYTHON=$(realpath -s "${DEB_PYTHON:-.venv/bin/python}")
"$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' || {
  echo "build-deb: $PYTHON is not a venv's python (the tested venv: make venv)" >&2; exit 1; }
arch=${DEB_ARCH:-$(dpkg-architecture -qDEB_BUILD_ARCH)}
# The package runs on Debian 12's python3 (3.11): its compiled wheels must be for 3.11.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "build-deb: $PYTHON is not Python 3.11 (Debian 12's); set DEB_PYTHON to a 3.11 venv's python" >&2
  exit 1; }
version=$(cd /tmp && "$PYTHON" -c 'import agent; print(agent.__version__)')
deb_version=${DEB_VERSION:-$version}
wheel=dist/bbprobe-$version-py3-none-any.whl
[ -f "$wheel" ] || { echo "build-deb: $wheel missing: run make dist first" >&2; exit 1; }

work=build/deb/bbprobe-$deb_version
rm -rf build/deb
mkdir -p "$work/wheel"
cp -r scripts/deb "$work/debian"
cp "$wheel" "$work/wheel/"
# What the rules install besides the wheel: the units and configs of the work tree (tracked
# or new; not ignored ones).
git ls-files -z --cached --others --exclude-standard systemd configs | xargs -0 cp --parents -t "$work"
"$PYTHON" -m pip freeze --exclude-editable --disable-pip-version-check \
  | grep -v -e ' @ ' -e '^-e ' > "$work/constraints.txt"
cat > "$work/debian/changelog" <<TXT
bbprobe ($deb_version) unstable; urgency=medium

  * Built from bbprobe $version ($(git rev-parse --short HEAD 2>/dev/null || echo unknown)).
    The project's history is its git log.

 -- bbprobe developers <bbprobe@localhost>  $(date -R)
TXT

flags=(-b -us -uc --host-arch "$arch")
# A cross build cannot satisfy Build-Depends for the foreign architecture; the rules
# compile nothing, so the native debhelper is all it needs.
[ "$arch" = "$(dpkg-architecture -qDEB_BUILD_ARCH)" ] || flags+=(-d)
(cd "$work" && DEB_PYTHON="$PYTHON" dpkg-buildpackage "${flags[@]}") \
  > build/deb/build.log 2>&1 || { tail -n 40 build/deb/build.log >&2; exit 1; }
deb=bbprobe_${deb_version}_${arch}.deb
mv "build/deb/$deb" "dist/$deb"
echo "$root/dist/$deb ($(du -h "dist/$deb" | cut -f1))"

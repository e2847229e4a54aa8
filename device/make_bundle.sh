#!/bin/sh
# Build .debs/bcc-bundle.tar.xz on a Debian 12 machine with a package registry: BCC 0.26,
# its LLVM/clang libraries, Debian's 6.1 kernel headers (x86 only), the Python bcc module,
# and the pure-Python / wheel dependencies renacerd needs that the GPU image lacks.
# The GPU machine has no registry; device/gpu_check.sh unpacks this bundle there.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .debs/pkgs .debs/wheels
cd .debs/pkgs
apt-get download python3-bpfcc libbpfcc libbpf1 libllvm14 libclang-cpp14 libz3-4 libxml2 \
    libicu72 libedit2 libelf1 libtinfo6 libffi8 libbsd0 libmd0 \
    linux-headers-6.1.0-56-amd64 linux-headers-6.1.0-56-common
cd ..
rm -rf root && mkdir root
for d in pkgs/*.deb; do dpkg-deb -x "$d" root; done
# keep what BCC loads and compiles against; drop docs and other architectures' headers
rm -rf root/usr/share root/etc root/usr/bin root/usr/sbin root/lib/modules
for a in root/usr/src/linux-headers-6.1.0-56-common/arch/*; do
    [ "$(basename "$a")" = x86 ] || rm -rf "$a"
done
../.venv/bin/pip download --quiet --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --implementation cp -d wheels orjson cxxfilt
tar -cJf bcc-bundle.tar.xz root wheels
rm -rf root pkgs
du -h bcc-bundle.tar.xz

# The sealvol driver image: built with cargo in a full Rust image, run in a slim Debian with only
# what the driver calls (e2fsprogs: mkfs.ext4, resize2fs, e2fsck; util-linux: blkid, wipefs) and
# the CA roots for Entra ID and Key Vault.
# Where no registry is reachable, hack/image builds the same contents offline and reproducibly
# (mmdebstrap from the machine's apt mirror, no apt in the image): keep the package list below
# the same as its `packages`, and PATH, entrypoint and command the same as its configuration.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sealvol --bin sealvol

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sealvol /usr/local/bin/sealvol
# Where the driver looks for the programs it runs (then /usr/sbin, /sbin, /usr/bin, /bin). At
# start it checks that each one exists and runs (`mkfs.ext4 -V`, ...) and refuses to start,
# naming the program, otherwise.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkfs.ext4 -V && e2fsck -V && blkid -V && wipefs -V && command -v resize2fs
# Non-root is impossible for a CSI node plugin: it attaches loop devices, formats and mounts
# filesystems with Bidirectional propagation into kubelet's directory, and adds fscrypt keys to
# the kernel. The DaemonSet runs it privileged; nothing else in this image runs.
USER 0
ENTRYPOINT ["/usr/local/bin/sealvol"]
CMD ["node"]

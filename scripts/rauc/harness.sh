# shellcheck shell=bash
# A RAUC test system in a directory: Debian's real `rauc service` on a D-Bus
# session bus, with two file-backed root filesystem slots (A and B) and an
# emulated U-Boot (scripts/rauc/bootloader) whose boot counting RAUC drives
# through its custom bootloader backend. Source it; scripts/test-rauc uses
# it, and so can an integration test of the daemon's mark-good:
#
#   source scripts/rauc/harness.sh
#   rauc_harness_init "$dir" "$keyring"     # system.conf, slots, bootloader
#   rauc_harness_flash "$dir" rootfs.ext4   # the factory image, into slot A
#   rauc_harness_bus                        # a private session bus (or run
#                                           # everything under dbus-run-session)
#   rauc_harness_boot "$dir"                # power-on: boot.scr picks a slot,
#                                           # rauc service starts on it
#   rauc install bundle.raucb               # RAUC's own client, over D-Bus
#   rauc_harness_reboot "$dir"              # ... and so on
#   rauc_harness_slot "$dir" B boot_status  # "good"/"bad", from rauc status
#   rauc_harness_stop "$dir"; rauc_harness_bus_stop
#
# Two bootloaders (rauc_harness_init's fifth argument):
#   emulated (default): scripts/rauc/bootloader on a state file
#     ($dir/bootenv), with the semantics of boot.scr and of RAUC's uboot
#     backend, which RAUC drives as its custom backend. Needs nothing else.
#   uboot: the real thing but the board. RAUC's own uboot backend, through
#     libubootenv's fw_printenv/fw_setenv, on a U-Boot environment in a
#     (virtual) flash image; a boot runs Debian's U-Boot for qemu_arm64 under
#     qemu-system-aarch64, which executes the device's boot script
#     (recipes-bsp/rpi-u-boot-scr/files/boot.cmd.in, built with mkimage) on
#     a disk of boot partition + slot A + slot B: it loads the kernel from
#     the chosen slot (Debian's arm64 kernel from scripts/vm-vivid's cache,
#     which the caller puts in the images' /boot/Image) and boots it; the
#     guest reports rauc.slot= and the OS version of the root it mounted.
#     Emulated there: the board (QEMU's virt machine, virtio for the SD card,
#     an initramfs for Debian's modular virtio-blk) and saveenv: QEMU 7.2's
#     flash fails U-Boot's writes, so U-Boot works on a copy and a dry run of
#     the same script and environment (kernel load address outside RAM, so
#     it stops at the load) prints the variables boot.scr saves, which
#     fw_setenv then stores, as saveenv would.
# Either way a "boot" ends with `rauc service --override-boot-slot=<slot>`
# (the kernel's rauc.slot= argument). Everything else is the real rauc:
# bundle checks, signature verification, the pre-install handler, writing
# the image into the slot, the slot status, mark-good.
#
# RAUC's client and service use the session bus when DBUS_STARTER_BUS_TYPE is
# "session" (src/main.c and src/service.c, RAUC 1.8); dbus-run-session does
# not set it, so this file exports it.

rauc_harness_lib=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rauc_harness_version_floor=$rauc_harness_lib/../../yocto/meta-dermascope/recipes-core/rauc/files/dermascope-version-floor
export DBUS_STARTER_BUS_TYPE=session

# rauc_harness_init DIR KEYRING [COMPATIBLE] [SLOT_MIB] [BOOTLOADER]
# Creates DIR (made absolute) with system.conf, empty slot files slot-A.img
# and slot-B.img (default 32 MiB), RAUC's data directory and the bootloader
# (emulated or uboot, see above), whose environment is as on a freshly
# flashed card: BOOT_ORDER "A B", 3 attempts each (uboot: unset until the
# first boot, whose boot.scr sets them so).
rauc_harness_init() {
    local dir=$1 keyring=$2 compatible=${3:-dermascope-test} mib=${4:-32} bootloader=${5:-emulated}
    mkdir -p "$dir/data" "$dir/mnt" "$dir/bin"
    dir=$(cd "$dir" && pwd)
    truncate -s "${mib}M" "$dir/slot-A.img" "$dir/slot-B.img"
    echo "$bootloader" > "$dir/bootloader-kind"
    local backend
    if [ "$bootloader" = uboot ]; then
        rauc_harness_uboot_init "$dir" "$mib"
        backend="bootloader=uboot"
    else
        # RAUC runs the backend with only its arguments: a wrapper names the
        # state file.
        printf '#!/bin/sh\nexec %q %q "$@"\n' "$rauc_harness_lib/bootloader" "$dir/bootenv" > "$dir/bootloader"
        chmod +x "$dir/bootloader"
        "$dir/bootloader" init
        backend="bootloader=custom"
    fi
    cp "$keyring" "$dir/keyring.pem"
    # The device's system.conf (files/system.conf of rauc-conf) with files
    # for block devices, the emulated bootloader for uboot, and the device's
    # own pre-install handler, the file the image ships (rauc-conf.bbappend),
    # which refuses a bundle below the running OS's version: RAUC 1.8 has no
    # min-bundle-version.
    # Plain bundles are allowed: installing a verity bundle needs
    # device-mapper (dm-verity), which CI machines may lack.
    cat > "$dir/system.conf" <<CONF
[system]
compatible=$compatible
$backend
mountprefix=$dir/mnt
data-directory=$dir/data

[handlers]
$([ "$bootloader" = uboot ] || echo "bootloader-custom-backend=$dir/bootloader")
pre-install=$rauc_harness_version_floor

[keyring]
path=$dir/keyring.pem

[slot.rootfs.0]
device=$dir/slot-A.img
type=ext4
bootname=A
resize=true

[slot.rootfs.1]
device=$dir/slot-B.img
type=ext4
bootname=B
resize=true
CONF
}

# rauc_harness_flash DIR IMAGE: writes IMAGE into slot A, as flashing the SD
# card does (rootfs A only; B stays empty in this test system).
rauc_harness_flash() {
    dd if="$2" of="$1/slot-A.img" conv=notrunc,fsync status=none
}

# rauc_harness_bus: starts a private session bus (for callers not already
# under dbus-run-session) and exports its address; rauc_harness_bus_stop
# ends it.
rauc_harness_bus() {
    local out
    out=$(dbus-daemon --session --fork --print-address=1 --print-pid=1 --nopidfile)
    DBUS_SESSION_BUS_ADDRESS=$(sed -n 1p <<< "$out")
    rauc_harness_bus_pid=$(sed -n 2p <<< "$out")
    export DBUS_SESSION_BUS_ADDRESS
}
rauc_harness_bus_stop() {
    if [ -n "${rauc_harness_bus_pid:-}" ]; then
        kill "$rauc_harness_bus_pid" 2>/dev/null || true
        rauc_harness_bus_pid=""
    fi
}

# rauc_harness_booted_version DIR SLOT: the marker /etc/dermascope-os-version
# of the root filesystem in slot SLOT (A or B), read with debugfs (no mount).
rauc_harness_slot_version() {
    debugfs -R "cat /etc/dermascope-os-version" "$1/slot-$2.img" 2>/dev/null | tr -d '[:space:]'
}

# rauc_harness_boot DIR: a power-on. The emulated boot.scr takes an attempt
# from the first bootable slot of BOOT_ORDER; rauc service starts as the
# system booted from it (its log: DIR/service.log, appended), and this waits
# until it answers on the bus (a hang watchdog of 20 s, not a timing check).
# The booted slot's /etc/dermascope-os-version becomes DIR/os-version, the
# running OS's version file that the device's pre-install handler reads
# (DERMASCOPE_OS_VERSION_FILE: RAUC runs on this machine, not in the slot).
rauc_harness_boot() {
    local dir=$1 slot i
    if [ "$(cat "$dir/bootloader-kind")" = uboot ]; then
        slot=$(rauc_harness_uboot_boot "$dir") || return 1
    else
        slot=$("$dir/bootloader" boot)
    fi
    echo "$slot" > "$dir/booted"
    rauc_harness_slot_version "$dir" "$slot" > "$dir/os-version"
    echo "--- boot: slot $slot (BOOT_ORDER=$(rauc_harness_env "$dir" BOOT_ORDER)" \
        "A=$(rauc_harness_env "$dir" BOOT_A_LEFT) B=$(rauc_harness_env "$dir" BOOT_B_LEFT))" >> "$dir/service.log"
    # $dir/bin first: uboot's fw_printenv/fw_setenv on this environment.
    PATH="$dir/bin:$PATH" DERMASCOPE_OS_VERSION_FILE="$dir/os-version" rauc service --conf="$dir/system.conf" --override-boot-slot="$slot" >> "$dir/service.log" 2>&1 &
    echo $! > "$dir/service.pid"
    for ((i = 0; i < 200; i++)); do
        if rauc status --output-format=json > /dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$dir/service.pid")" 2>/dev/null; then
            echo "rauc service exited; see $dir/service.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "rauc service did not answer within 20 s (watchdog); see $dir/service.log" >&2
    return 1
}

# rauc_harness_stop DIR: stops rauc service (a power-off, for RAUC's part).
rauc_harness_stop() {
    local pid
    [ -f "$1/service.pid" ] || return 0
    pid=$(cat "$1/service.pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$1/service.pid"
}

# rauc_harness_reboot DIR: stop, then boot.
rauc_harness_reboot() {
    rauc_harness_stop "$1"
    rauc_harness_boot "$1"
}

# rauc_harness_status: `rauc status --detailed --output-format=json`, from the
# running service.
rauc_harness_status() {
    rauc status --detailed --output-format=json 2> /dev/null
}

# rauc_harness_slot DIR SLOT FIELD: one field of slot SLOT (bootname A or B)
# in rauc status's JSON: state (booted/inactive), boot_status (good/bad), or
# bundle_version (the version RAUC installed into it; empty if none). With
# SLOT "-": booted (the booted bootname) or primary (the primary's bootname).
rauc_harness_slot() {
    rauc_harness_status | python3 -c '
import json, sys
slot, field = sys.argv[1], sys.argv[2]
status = json.load(sys.stdin)
slots = {}
for entry in status["slots"]:
    for name, info in entry.items():
        slots[info.get("bootname")] = (name, info)
if slot == "-":
    if field == "booted":
        print(status["booted"])
    elif field == "primary":
        print(next((b for b, (n, _) in slots.items() if n == status["boot_primary"]), ""))
    sys.exit(0)
name, info = slots[slot]
if field == "bundle_version":
    print(((info.get("slot_status") or {}).get("bundle") or {}).get("version") or "")
else:
    print(info.get(field) or "")
' "$2" "$3"
}

# rauc_harness_env DIR NAME: a bootloader variable (BOOT_ORDER, BOOT_A_LEFT,
# BOOT_B_LEFT) as the bootloader's environment holds it now.
rauc_harness_env() {
    if [ "$(cat "$1/bootloader-kind")" = uboot ]; then
        "$1/bin/fw_printenv" -n "$2" 2> /dev/null || true
    else
        (
            # shellcheck disable=SC1091 # the state file is written at run time
            . "$1/bootenv"
            eval "echo \"\${$2:-}\""
        )
    fi
}

# --- uboot: Debian's U-Boot for qemu_arm64 runs the device's boot script ----
rauc_harness_uboot_bin=/usr/lib/u-boot/qemu_arm64/u-boot.bin
# The guest's kernel modules and busybox: the cache scripts/vm-vivid builds
# (Debian's arm64 kernel; the slots' /boot/Image is that kernel).
rauc_harness_guest=${RAUC_HARNESS_GUEST:-$rauc_harness_lib/../../.cache/vm/guest}
# The disk's layout, in MiB: as wic/dermascope-ab.wks.in numbers them,
# 1 boot (8 MiB), 2 rootfs A, 3 rootfs B (no data partition: nothing here
# uses it).
rauc_harness_uboot_init() {
    local dir=$1 mib=$2 tool
    for tool in qemu-system-aarch64 mkimage mkenvimage fw_printenv fw_setenv cpio gzip; do
        command -v "$tool" > /dev/null || { echo "rauc harness (uboot): $tool is missing" >&2; return 1; }
    done
    [ -f "$rauc_harness_uboot_bin" ] || { echo "rauc harness (uboot): $rauc_harness_uboot_bin is missing (u-boot-qemu)" >&2; return 1; }
    [ -f "$rauc_harness_guest/base.cpio.gz" ] || { echo "rauc harness (uboot): no $rauc_harness_guest/base.cpio.gz (run scripts/vm-vivid once)" >&2; return 1; }
    echo "$mib" > "$dir/slot-mib"
    # boot.scr as rpi-u-boot-scr builds it (meta-raspberrypi's sed, then the
    # bbappend's), with virtio for the Pi's mmc.
    mkdir -p "$dir/bootfs" "$dir/initramfs"
    sed -e 's/@@KERNEL_IMAGETYPE@@/Image/' -e 's/@@KERNEL_BOOTCMD@@/booti/' \
        -e 's/@@BOOT_MEDIA@@/virtio/' -e 's|@@DERMASCOPE_RAUC_DISK@@|/dev/mmcblk0|g' \
        "$rauc_harness_lib/../../yocto/meta-dermascope/recipes-bsp/rpi-u-boot-scr/files/boot.cmd.in" > "$dir/boot.cmd"
    mkimage -A arm64 -T script -C none -n "Boot script" -d "$dir/boot.cmd" "$dir/bootfs/boot.scr" > /dev/null
    # The dry run's copy prints what each saveenv stores, right after it:
    # boot.scr resets when the kernel does not load (as in the dry run), so
    # the bootcmd never gets to print it afterwards. Only the dry run uses it.
    sed 's/^\([[:space:]]*\)saveenv$/&\n\1printenv BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT/' "$dir/boot.cmd" > "$dir/boot-dry.cmd"
    mkimage -A arm64 -T script -C none -n "Boot script (dry run)" -d "$dir/boot-dry.cmd" "$dir/bootfs/boot-dry.scr" > /dev/null
    # The guest's PID 1 reports which slot the kernel was told (rauc.slot=,
    # what RAUC reads from /proc/cmdline) and what it mounted as root (the
    # Pi's mmcblk0pN is virtio's vdaN here), then powers off. An initramfs
    # only because Debian's kernel has virtio-blk and ext4 as modules; the
    # Pi's kernel mounts root itself.
    cat > "$dir/initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in virtio_mmio virtio_blk crc32c_generic ext4; do modprobe "$module"; done
slot=
root=
for arg in $(cat /proc/cmdline); do
    case $arg in
        rauc.slot=*) slot=${arg#rauc.slot=} ;;
        root=*) root=${arg#root=} ;;
    esac
done
part=${root##*p}
tries=0
while [ ! -e "/dev/vda$part" ] && [ "$tries" -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
version=
if mount -t ext4 -o ro "/dev/vda$part" /mnt; then
    version=$(cat /mnt/etc/dermascope-os-version)
fi
echo "dermascope-cmdline: $(cat /proc/cmdline)"
echo "dermascope-boot: slot=$slot root=$root version=$version"
poweroff -f
INIT
    chmod 755 "$dir/initramfs/init"
    {
        cat "$rauc_harness_guest/base.cpio.gz"
        (cd "$dir/initramfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1)
    } > "$dir/bootfs/initrd.gz"
    mkfs.ext4 -q -F -d "$dir/bootfs" "$dir/boot.img" 8M > /dev/null 2>&1
    # U-Boot's own flash bank 0 and its environment in bank 1 (64 MiB each;
    # qemu_arm64's environment: the first 256 KiB of bank 1): the board's
    # defaults U-Boot needs, and a bootcmd that does what the Pi's firmware
    # does (a command line, the device tree, then boot.scr), here also the
    # initramfs in the device tree's /chosen. With dermascope_dry_run set,
    # the kernel's load address is outside RAM: boot-dry.scr (boot.scr that
    # prints the variables after each saveenv) runs up to its failing load,
    # printing what saveenv would have stored, and resets.
    cp "$rauc_harness_uboot_bin" "$dir/flash0.img"
    truncate -s 64M "$dir/flash0.img"
    cat > "$dir/uboot-env.txt" <<'ENV'
bootdelay=0
baudrate=115200
fdt_addr=0x40000000
scriptaddr=0x40200000
kernel_addr_r=0x40400000
ramdisk_addr_r=0x44000000
bootcmd=virtio scan; load virtio 0:1 ${ramdisk_addr_r} initrd.gz; setexpr initrd_end ${ramdisk_addr_r} + ${filesize}; fdt addr ${fdt_addr}; fdt resize 1024; fdt set /chosen linux,initrd-start <0x0 ${ramdisk_addr_r}>; fdt set /chosen linux,initrd-end <0x0 0x${initrd_end}>; setenv bootargs "console=ttyAMA0 panic=-1"; setenv script boot.scr; if test -n "${dermascope_dry_run}"; then setenv kernel_addr_r 0x10000000; setenv script boot-dry.scr; fi; load virtio 0:1 ${scriptaddr} ${script}; source ${scriptaddr}; poweroff
ENV
    mkenvimage -s 0x40000 -o "$dir/flash1.img" "$dir/uboot-env.txt"
    truncate -s 64M "$dir/flash1.img"
    echo "$dir/flash1.img 0x0 0x40000" > "$dir/fw_env.config"
    echo "$dir/flash1-boot.img 0x0 0x40000" > "$dir/fw_env-boot.config"
    local name
    for name in fw_printenv fw_setenv; do
        printf '#!/bin/sh\nexec %q -c %q "$@"\n' "$(command -v "$name")" "$dir/fw_env.config" > "$dir/bin/$name"
        chmod +x "$dir/bin/$name"
    done
    echo 0 > "$dir/uboot-boots"
}

# One run of the machine; its console, without CRs, in $2.
rauc_harness_uboot_run() {
    local dir=$1 log=$2
    # 120 s is a hang watchdog; a run takes a few seconds. -no-reboot:
    # boot.scr's `reset` and the guest's poweroff end qemu.
    timeout 120 qemu-system-aarch64 -M virt -cpu cortex-a72 -m 512 -nographic -nic none -no-reboot \
        -drive if=pflash,format=raw,index=0,file="$dir/flash0.img",readonly=on \
        -drive if=pflash,format=raw,index=1,file="$dir/flash1-boot.img" \
        -drive if=none,file="$dir/disk.img",format=raw,id=disk \
        -device virtio-blk-device,drive=disk \
        -monitor none -serial stdio < /dev/null 2>&1 | tr -d '\r' > "$log" || true
}

# Prints the slot the guest's kernel was booted as (rauc.slot=); the
# consoles are in DIR/uboot-<n>.log-dry and DIR/uboot-<n>.log. A U-Boot run
# that resets (no slot with attempts left, or a kernel that did not load or
# start) is followed by the next one, as on the board; eight in a row (both
# slots' 3 attempts, the reset to 3, and one more) fail the boot.
rauc_harness_uboot_boot() {
    local dir=$1 mib n log slot
    mib=$(cat "$dir/slot-mib")
    for _ in 1 2 3 4 5 6 7 8; do
        n=$(($(cat "$dir/uboot-boots") + 1))
        echo "$n" > "$dir/uboot-boots"
        log=$dir/uboot-$n.log
        # The SD card: MBR, boot at 1 MiB, A and B after it.
        truncate -s 0 "$dir/disk.img"
        truncate -s "$((1 + 8 + 2 * mib))M" "$dir/disk.img"
        python3 - "$dir/disk.img" "$mib" <<'PY'
import struct, sys
path, mib = sys.argv[1], int(sys.argv[2])
sectors = 2048  # 1 MiB
parts = [(sectors, 8 * sectors), (9 * sectors, mib * sectors), ((9 + mib) * sectors, mib * sectors)]
mbr = bytearray(512)
for i, (start, size) in enumerate(parts):
    mbr[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0x80 if i == 0 else 0, b"\xff" * 3, 0x83, b"\xff" * 3, start, size)
mbr[510:512] = b"\x55\xaa"
with open(path, "r+b") as disk:
    disk.write(mbr)
PY
        dd if="$dir/boot.img" of="$dir/disk.img" bs=1M seek=1 conv=notrunc status=none
        dd if="$dir/slot-A.img" of="$dir/disk.img" bs=1M seek=9 conv=notrunc status=none
        dd if="$dir/slot-B.img" of="$dir/disk.img" bs=1M seek=$((9 + mib)) conv=notrunc status=none
        # U-Boot works on a copy of the environment's flash: its saveenv
        # erases the sector and then fails to write it (QEMU 7.2), which
        # would lose the environment. The dry run first, for the values
        # boot.scr saves; then the same environment boots Linux.
        cp --sparse=always "$dir/flash1.img" "$dir/flash1-boot.img"
        fw_setenv -c "$dir/fw_env-boot.config" dermascope_dry_run 1
        rauc_harness_uboot_run "$dir" "$log-dry"
        if grep -q "RAUC: no slot has attempts left" "$log-dry"; then
            # What boot.scr saved before its reset.
            "$dir/bin/fw_setenv" BOOT_A_LEFT 3
            "$dir/bin/fw_setenv" BOOT_B_LEFT 3
            continue
        fi
        if ! grep -q '^BOOT_ORDER=' "$log-dry"; then
            echo "rauc harness (uboot): boot $n: boot.scr printed no environment; see $log-dry" >&2
            return 1
        fi
        cp --sparse=always "$dir/flash1.img" "$dir/flash1-boot.img"
        rauc_harness_uboot_run "$dir" "$log"
        # What saveenv would have stored (the last values the dry run printed):
        # the attempt is spent whether or not Linux comes up.
        local var value
        for var in BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; do
            value=$(sed -n "s/^$var=//p" "$log-dry" | tail -n 1)
            "$dir/bin/fw_setenv" "$var" "$value"
        done
        slot=$(sed -n 's/^dermascope-boot: slot=\([AB]\) .*/\1/p' "$log")
        if [ -z "$slot" ]; then
            if grep -A1 "^RAUC: the kernel of slot [AB] did not start; resetting" "$log" | grep -q "^resetting \.\.\."; then
                # boot.scr reset (U-Boot's own "resetting ...") after a
                # kernel that would not start: U-Boot runs again, as the
                # board's reset does.
                continue
            fi
            echo "rauc harness (uboot): boot $n: Linux did not report its slot; see $log" >&2
            return 1
        fi
        if ! grep -q "^RAUC: booting slot $slot," "$log-dry"; then
            echo "rauc harness (uboot): boot $n: the dry run chose another slot than $slot; see $log-dry" >&2
            return 1
        fi
        echo "$slot"
        return 0
    done
    echo "rauc harness (uboot): boot.scr reset eight times in a row; see $log-dry" >&2
    return 1
}

# rauc_harness_uboot_last DIR: the guest's report of the last boot,
# "slot=B root=/dev/mmcblk0p3 version=1.1.0" (rauc.slot= and root= from the
# kernel's command line, the version from the root filesystem it mounted).
rauc_harness_uboot_last() {
    sed -n 's/^dermascope-boot: //p' "$1/uboot-$(cat "$1/uboot-boots").log"
}

# rauc_harness_uboot_cmdline DIR: the kernel command line of the last boot,
# as the guest read it from /proc/cmdline.
rauc_harness_uboot_cmdline() {
    sed -n 's/^dermascope-cmdline: //p' "$1/uboot-$(cat "$1/uboot-boots").log"
}

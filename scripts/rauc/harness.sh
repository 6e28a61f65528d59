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
# What is emulated, and why: there is no Raspberry Pi (nor U-Boot) here. The
# bootloader is scripts/rauc/bootloader on a state file ($dir/bootenv), with
# the semantics of boot.scr and of RAUC's uboot backend; a "boot" is that
# script choosing a slot and `rauc service --override-boot-slot=<it>` being
# started, in place of the kernel's rauc.slot= argument. Everything else is
# the real rauc: bundle checks, signature verification, the pre-install
# handler, writing the image into the slot, the slot status, mark-good.
#
# RAUC's client and service use the session bus when DBUS_STARTER_BUS_TYPE is
# "session" (src/main.c and src/service.c, RAUC 1.8); dbus-run-session does
# not set it, so this file exports it.

rauc_harness_lib=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DBUS_STARTER_BUS_TYPE=session

# rauc_harness_init DIR KEYRING [COMPATIBLE] [SLOT_SIZE]
# Creates DIR (absolute or relative; made absolute) with system.conf, empty
# slot files slot-A.img and slot-B.img (default 32M), the bootloader state
# (BOOT_ORDER "A B", 3 attempts each) and RAUC's data directory.
rauc_harness_init() {
    local dir=$1 keyring=$2 compatible=${3:-dermascope-test} size=${4:-32M}
    mkdir -p "$dir/data" "$dir/mnt"
    dir=$(cd "$dir" && pwd)
    truncate -s "$size" "$dir/slot-A.img" "$dir/slot-B.img"
    # RAUC runs the backend with only its arguments: a wrapper names the state.
    printf '#!/bin/sh\nexec %q %q "$@"\n' "$rauc_harness_lib/bootloader" "$dir/bootenv" > "$dir/bootloader"
    chmod +x "$dir/bootloader"
    "$dir/bootloader" init
    cp "$keyring" "$dir/keyring.pem"
    # The device's system.conf (files/system.conf of rauc-conf) with files
    # for block devices, the emulated bootloader for uboot, and the version
    # floor as a pre-install handler for min-bundle-version (RAUC < 1.12).
    # Plain bundles are allowed: installing a verity bundle needs
    # device-mapper (dm-verity), which CI machines may lack.
    cat > "$dir/system.conf" <<CONF
[system]
compatible=$compatible
bootloader=custom
mountprefix=$dir/mnt
data-directory=$dir/data

[handlers]
bootloader-custom-backend=$dir/bootloader
pre-install=$rauc_harness_lib/version-floor

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
# The booted slot's OS version becomes the floor for the next bundle, as the
# device's system.conf has min-bundle-version = its own image's version.
rauc_harness_boot() {
    local dir=$1 slot i
    slot=$("$dir/bootloader" boot)
    echo "$slot" > "$dir/booted"
    rauc_harness_slot_version "$dir" "$slot" > "$dir/min-bundle-version"
    echo "--- boot: slot $slot ($(tr '\n' ' ' < "$dir/bootenv"))" >> "$dir/service.log"
    rauc service --conf="$dir/system.conf" --override-boot-slot="$slot" >> "$dir/service.log" 2>&1 &
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

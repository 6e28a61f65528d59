//! systemd's notify protocol (ARCHITECTURE.md: "`run` (the daemon, with
//! sd_notify READY/WATCHDOG/STOPPING and a SIGTERM flag)"): `dermascope
//! run` as a process, with a `NOTIFY_SOCKET` this test listens on as
//! systemd would, stopped with SIGTERM as `systemctl stop` does.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{dermascope, Running};

/// Watchdog for every wait below: start-up loads the encoder (seconds), the
/// loop pings at least every 250 ms; this only stops a hung daemon from
/// hanging the suite.
const WATCHDOG: Duration = Duration::from_secs(300);

/// One datagram, without the newline sd-notify ends each state with.
fn message(datagram: &[u8]) -> String {
    String::from_utf8_lossy(datagram).trim_end().to_string()
}

/// The notifications with repeats counted, short enough for a message.
fn describe(messages: &[String]) -> String {
    let mut runs: Vec<(usize, &str)> = Vec::new();
    for m in messages {
        match runs.last_mut() {
            Some((n, last)) if *last == m.as_str() => *n += 1,
            _ => runs.push((1, m)),
        }
    }
    runs.iter()
        .map(|(n, m)| format!("{n} x {m:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn ready_watchdog_and_stopping_reach_the_notify_socket_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let replay = dir.path().join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    image::RgbImage::from_pixel(64, 48, image::Rgb([200, 150, 130]))
        .save(replay.join("frame.png"))
        .unwrap();
    let config = dir.path().join("dermascope.toml");
    std::fs::write(
        &config,
        format!(
            "[camera]\nreplay_dir = {replay:?}\n[trigger]\nsocket = {socket:?}\n\
             [display]\npng_dir = {screens:?}\n[store]\ndir = {store:?}\n\
             [adapter]\ndir = {adapter:?}\n",
            socket = dir.path().join("control.sock"),
            screens = dir.path().join("screens"),
            store = dir.path().join("cases"),
            adapter = dir.path().join("no-adapter"),
        ),
    )
    .unwrap();
    let daemon = Running::spawn(
        dermascope()
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &notify)
            // The value is systemd's; the daemon pings every loop tick.
            .env("WATCHDOG_USEC", "2000000")
            .args(["run", "--config"])
            .arg(&config),
    );

    let mut messages: Vec<String> = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + WATCHDOG;
    let mut terminated = false;
    loop {
        assert!(
            Instant::now() < deadline,
            "watchdog: {WATCHDOG:?} passed; notifications so far {}",
            describe(&messages)
        );
        match listener.recv(&mut buffer) {
            Ok(n) => messages.push(message(&buffer[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
        let ready = messages.iter().position(|m| m.contains("READY=1"));
        let pinged_after_ready =
            ready.is_some_and(|r| messages[r + 1..].iter().any(|m| m == "WATCHDOG=1"));
        if pinged_after_ready && !terminated {
            // SIGTERM, as systemd stops the service.
            let pid = daemon.child.id().to_string();
            assert!(Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
            terminated = true;
        }
        if messages.last().is_some_and(|m| m == "STOPPING=1") {
            break;
        }
    }
    let output = daemon.finish(Instant::now() + WATCHDOG);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("shutdown requested"), "{err}");
    // Nothing after STOPPING: drain what the socket still holds.
    while let Ok(n) = listener.recv(&mut buffer) {
        messages.push(message(&buffer[..n]));
    }

    eprintln!("notifications: {}", describe(&messages));
    // READY (with a status line) first, then only watchdog pings, then
    // STOPPING last.
    let ready = &messages[0];
    assert!(
        ready.lines().any(|l| l == "READY=1")
            && ready.lines().any(|l| l.starts_with("STATUS=ready: ")),
        "first notification is not READY with a status: {}",
        describe(&messages)
    );
    let (stopping, pings) = messages[1..].split_last().unwrap();
    assert_eq!(stopping, "STOPPING=1", "{}", describe(&messages));
    assert!(
        !pings.is_empty() && pings.iter().all(|m| m == "WATCHDOG=1"),
        "between READY and STOPPING only watchdog pings: {}",
        describe(&messages)
    );
}

//! The control socket with several clients, slow and idle ones, a full
//! queue, and peers of other users.
//!
//! Runs with its own `main` (harness = false): the same binary is re-executed
//! as a one-line client (selected by `DERMASCOPE_SOCKET_CLIENT`), started as
//! another user (`nobody`, with the groups a test picks) where the test runs
//! as root. Nothing here waits for a duration to pass: each step waits for a
//! reply or an end of stream, under a watchdog.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dermascope_device::{ControlSocketOptions, ControlSocketTrigger, Trigger, TriggerEvent};

/// Set in a client child: the socket to connect to.
const CLIENT: &str = "DERMASCOPE_SOCKET_CLIENT";
/// Set in a client child: the line it sends.
const LINE: &str = "DERMASCOPE_SOCKET_LINE";
/// Watchdog, not a measurement: a reply or end of stream that has not come
/// by then never will.
const WATCHDOG: Duration = Duration::from_secs(60);
/// `nobody` on Debian and most distributions; the tests set its groups
/// themselves, so its entry in /etc/passwd does not matter.
const NOBODY: u32 = 65534;
/// A group no account needs to have: the kernel checks gids, not names.
const PRESS_GROUP: u32 = 4242;

type TestFn = fn() -> Result<(), String>;

fn main() {
    if let Ok(path) = std::env::var(CLIENT) {
        client_child(Path::new(&path));
        return;
    }
    let tests: [(&str, TestFn); 9] = [
        ("several_clients_are_served_at_once", several_clients),
        ("an_idle_client_does_not_block_a_press", idle_does_not_block),
        ("a_client_that_sends_nothing_is_dropped", idle_is_dropped),
        (
            "a_client_that_reads_no_replies_is_dropped",
            slow_reader_is_dropped,
        ),
        ("a_full_queue_refuses_with_a_clear_reply", full_queue),
        ("one_client_too_many_is_told_busy", too_many_clients),
        (
            "the_socket_file_is_private_from_creation",
            private_from_creation,
        ),
        ("a_peer_of_another_user_is_refused", other_user_refused),
        (
            "a_group_member_may_press_but_not_shut_down",
            group_member_presses,
        ),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match test() {
            Ok(()) => println!("test {name} ... ok"),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED: {why}");
            }
        }
    }
    println!();
    println!(
        "control-socket: {} passed, {failed} failed",
        tests.len() - failed
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// Sends `$DERMASCOPE_SOCKET_LINE` and prints every reply line, or
/// `connect-error: <kind>` when the connection is refused.
fn client_child(path: &Path) {
    let line = std::env::var(LINE).unwrap_or_default();
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) => {
            println!("connect-error: {:?}", e.kind());
            return;
        }
    };
    let _ = stream.set_read_timeout(Some(WATCHDOG));
    // A refused peer may be cut off before it writes: the reply still waits.
    let _ = writeln!(stream, "{line}");
    let _ = stream.shutdown(std::net::Shutdown::Write);
    for reply in BufReader::new(stream).lines() {
        match reply {
            Ok(reply) => println!("{reply}"),
            Err(e) => {
                println!("read-error: {:?}", e.kind());
                break;
            }
        }
    }
}

fn err(context: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// One connection, with a watchdog on every read.
struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Result<Self, String> {
        let stream = UnixStream::connect(path).map_err(err("connecting"))?;
        stream
            .set_read_timeout(Some(WATCHDOG))
            .map_err(err("read timeout"))?;
        stream
            .set_write_timeout(Some(WATCHDOG))
            .map_err(err("write timeout"))?;
        let reader = BufReader::new(stream.try_clone().map_err(err("clone"))?);
        Ok(Self {
            writer: stream,
            reader,
        })
    }

    fn send(&mut self, text: &str) -> Result<(), String> {
        self.writer
            .write_all(text.as_bytes())
            .map_err(err("sending"))
    }

    /// The next reply line; `None` at end of stream.
    fn reply(&mut self) -> Result<Option<String>, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err("watchdog: no reply".into())
            }
            Err(e) => Err(format!("reading a reply: {e}")),
        }
    }

    fn ask(&mut self, line: &str) -> Result<String, String> {
        self.send(&format!("{line}\n"))?;
        self.reply()?
            .ok_or_else(|| format!("the socket closed instead of answering {line:?}"))
    }
}

fn expect(what: &str, got: impl AsRef<str>, wanted: &str) -> Result<(), String> {
    let got = got.as_ref();
    if got.starts_with(wanted) {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, expected {wanted:?}..."))
    }
}

/// The events waiting now: after a client's `ok`, its event is queued
/// already, so nothing here waits for one.
fn drain(trigger: &mut ControlSocketTrigger) -> Result<Vec<TriggerEvent>, String> {
    let mut events = Vec::new();
    while let Some(event) = trigger.wait(Duration::ZERO).map_err(|e| e.to_string())? {
        events.push(event);
    }
    Ok(events)
}

fn socket(
    options: ControlSocketOptions,
) -> Result<(tempfile::TempDir, ControlSocketTrigger), String> {
    let dir = tempfile::tempdir().map_err(err("tempdir"))?;
    let trigger = ControlSocketTrigger::bind_with(dir.path().join("control.sock"), options)
        .map_err(|e| e.to_string())?;
    Ok((dir, trigger))
}

fn several_clients() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions::default())?;
    let mut clients = (0..4)
        .map(|_| Client::connect(trigger.path()))
        .collect::<Result<Vec<_>, _>>()?;
    // The last to connect speaks first: served one at a time, it would wait
    // for the first to hang up.
    for (n, client) in clients.iter_mut().enumerate().rev() {
        expect(&format!("client {n}"), client.ask("capture")?, "ok")?;
    }
    let events = drain(&mut trigger)?;
    if events != vec![TriggerEvent::Capture; 4] {
        return Err(format!("events {events:?}"));
    }
    Ok(())
}

fn idle_does_not_block() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions::default())?;
    let mut idle = Client::connect(trigger.path())?;
    // Half a command, then nothing.
    idle.send("capt")?;
    let mut presser = Client::connect(trigger.path())?;
    expect("the second client", presser.ask("confirm mel")?, "ok")?;
    let events = drain(&mut trigger)?;
    let confirm = TriggerEvent::Confirm {
        label: Some("mel".into()),
    };
    if events != [confirm] {
        return Err(format!("events {events:?}"));
    }
    // The idle client's half line was kept.
    expect("the idle client", idle.ask("ure")?, "ok")?;
    let events = drain(&mut trigger)?;
    if events != [TriggerEvent::Capture] {
        return Err(format!("events {events:?}"));
    }
    Ok(())
}

fn idle_is_dropped() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions {
        idle_timeout: Duration::from_millis(100),
        ..ControlSocketOptions::default()
    })?;
    let mut silent = Client::connect(trigger.path())?;
    // Bytes without a newline do not count as activity.
    silent.send("c")?;
    let reply = silent.reply()?.ok_or("closed without saying why")?;
    expect("the silent client", reply, "error: no command for")?;
    if let Some(more) = silent.reply()? {
        return Err(format!("still open after the idle reply: {more:?}"));
    }
    // The listener goes on.
    expect(
        "a new client",
        Client::connect(trigger.path())?.ask("capture")?,
        "ok",
    )?;
    expect("events", format!("{:?}", drain(&mut trigger)?), "[Capture]")
}

fn slow_reader_is_dropped() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions {
        write_timeout: Duration::from_millis(100),
        ..ControlSocketOptions::default()
    })?;
    let mut flood = Client::connect(trigger.path())?;
    // Each line earns an error reply that is never read; once the socket's
    // buffers are full the daemon's write times out and it hangs up, which
    // turns this client's writes into errors. 64 MiB is far beyond any
    // socket buffer: reaching it means the daemon never gave up.
    let line = b"nonsense-command-that-earns-an-error-reply\n";
    let mut sent = 0usize;
    let cut_off = loop {
        if sent > 64 << 20 {
            return Err("the daemon kept a client that reads no replies".into());
        }
        match flood.writer.write_all(line) {
            Ok(()) => sent += line.len(),
            Err(e) => break e,
        }
    };
    if !matches!(
        cut_off.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
    ) {
        return Err(format!("the flood ended with {cut_off} (watchdog?)"));
    }
    expect(
        "a new client",
        Client::connect(trigger.path())?.ask("capture")?,
        "ok",
    )?;
    expect("events", format!("{:?}", drain(&mut trigger)?), "[Capture]")
}

fn full_queue() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions {
        queue_len: 2,
        ..ControlSocketOptions::default()
    })?;
    let mut client = Client::connect(trigger.path())?;
    expect("first", client.ask("capture")?, "ok")?;
    expect("second", client.ask("confirm")?, "ok")?;
    expect("third", client.ask("capture")?, "error: busy")?;
    let events = drain(&mut trigger)?;
    if events != [TriggerEvent::Capture, TriggerEvent::Confirm { label: None }] {
        return Err(format!("events {events:?}"));
    }
    // Taken by the daemon, the queue has room again.
    expect("after the daemon took them", client.ask("capture")?, "ok")?;
    expect("events", format!("{:?}", drain(&mut trigger)?), "[Capture]")
}

fn too_many_clients() -> Result<(), String> {
    let (_dir, mut trigger) = socket(ControlSocketOptions {
        max_clients: 2,
        ..ControlSocketOptions::default()
    })?;
    let mut first = Client::connect(trigger.path())?;
    let mut second = Client::connect(trigger.path())?;
    // An answer means the client is being served, so it holds its place.
    expect("first", first.ask("capture")?, "ok")?;
    expect("second", second.ask("capture")?, "ok")?;
    let mut third = Client::connect(trigger.path())?;
    let reply = third.reply()?.ok_or("closed without saying why")?;
    expect("third", reply, "error: busy: 2 clients")?;
    if let Some(more) = third.reply()? {
        return Err(format!("the refused client is still open: {more:?}"));
    }
    drop(first);
    // The first's thread ends on its own time after the hang-up: try until
    // a client is served again.
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let reply = Client::connect(trigger.path())?.ask("capture")?;
        if reply == "ok" {
            break;
        }
        expect("while the first leaves", &reply, "error: busy")?;
        if Instant::now() > deadline {
            return Err("watchdog: no place was freed by a client that left".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    expect("second, still served", second.ask("capture")?, "ok")?;
    expect(
        "events",
        format!("{:?}", drain(&mut trigger)?),
        "[Capture, Capture, Capture, Capture]",
    )
}

fn umask(mask: u32) -> u32 {
    // SAFETY: umask only swaps the process's mask; it cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

fn mode_of(path: &Path) -> Result<(bool, u32, u32), String> {
    let m = fs::symlink_metadata(path).map_err(err("stat"))?;
    Ok((m.file_type().is_socket(), m.mode() & 0o7777, m.gid()))
}

fn private_from_creation() -> Result<(), String> {
    // A umask that leaves everything open: a socket made by bind at its path
    // would be 0777 there until a chmod.
    let old = umask(0);
    let result = (|| {
        let dir = tempfile::tempdir().map_err(err("tempdir"))?;
        let path = dir.path().join("control.sock");
        let watch = Inotify::watch(dir.path())?;
        let trigger = ControlSocketTrigger::bind(&path).map_err(|e| e.to_string())?;
        let (is_socket, mode, _) = mode_of(&path)?;
        if !is_socket || mode != 0o600 {
            return Err(format!(
                "right after bind: socket {is_socket}, mode {mode:o}"
            ));
        }
        // The kernel reports a creation at the path (IN_CREATE) and any
        // chmod or chown there (IN_ATTRIB) as the calls happen, so by now
        // the queue holds all of them: the socket must have arrived whole,
        // by a rename.
        let events = watch.events_for("control.sock")?;
        if events != [libc::IN_MOVED_TO] {
            return Err(format!(
                "the socket's path saw {} (expected only a rename into place)",
                describe(&events)
            ));
        }
        drop(trigger);
        // With a group allowed: group-owned, 0660, from the start too.
        let trigger = ControlSocketTrigger::bind_with(
            &path,
            ControlSocketOptions {
                allowed_gid: Some(PRESS_GROUP),
                ..ControlSocketOptions::default()
            },
        );
        match trigger {
            Ok(_trigger) => {
                let (_, mode, gid) = mode_of(&path)?;
                if (mode, gid) != (0o660, PRESS_GROUP) {
                    return Err(format!("group socket: mode {mode:o}, gid {gid}"));
                }
                let events = watch.events_for("control.sock")?;
                // The first socket's removal at drop, then the new one.
                if events != [libc::IN_MOVED_TO] {
                    return Err(format!("group socket: the path saw {}", describe(&events)));
                }
            }
            // Giving a socket to a group one is not in needs root.
            Err(e) if !is_root() => eprintln!("group socket not checked (not root): {e}"),
            Err(e) => return Err(e.to_string()),
        }
        // The private folders the socket was bound in are gone.
        let left: Vec<_> = fs::read_dir(dir.path())
            .map_err(err("listing"))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        if !left.is_empty() {
            return Err(format!("left behind: {left:?}"));
        }
        Ok(())
    })();
    umask(old);
    result
}

fn describe(events: &[u32]) -> String {
    let names: Vec<&str> = events
        .iter()
        .map(|&mask| match mask {
            libc::IN_CREATE => "a creation",
            libc::IN_ATTRIB => "a mode or owner change",
            libc::IN_MOVED_TO => "a rename into place",
            _ => "another event",
        })
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// An inotify watch on a folder for creations, renames into it and
/// attribute changes of its entries.
struct Inotify {
    fd: std::os::fd::OwnedFd,
}

impl Inotify {
    fn watch(dir: &Path) -> Result<Self, String> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let c_dir =
            std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: plain syscalls; the descriptor is owned from here on.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK);
            if fd < 0 {
                return Err(format!(
                    "inotify_init1: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mask = libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO;
            use std::os::fd::AsRawFd;
            if libc::inotify_add_watch(fd.as_raw_fd(), c_dir.as_ptr(), mask) < 0 {
                return Err(format!(
                    "inotify_add_watch: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(Self { fd })
        }
    }

    /// The events queued so far for the entry `name`, in order (each
    /// reduced to the watched bit it carries).
    fn events_for(&self, name: &str) -> Result<Vec<u32>, String> {
        use std::os::fd::AsRawFd;
        let mut events = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::WouldBlock {
                    return Ok(events);
                }
                return Err(format!("reading inotify events: {e}"));
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote a whole event at `at`; read_unaligned
                // copes with the byte buffer's alignment.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buffer[at..].as_ptr().cast()) };
                let raw = &buffer[at + header..at + header + event.len as usize];
                let entry = raw.split(|&b| b == 0).next().unwrap_or_default();
                if entry == name.as_bytes() {
                    let watched = libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO;
                    events.push(event.mask & watched);
                }
                at += header + event.len as usize;
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A folder everyone can search, holding a copy of this binary that
/// everyone can run (the build's folder may not be).
struct Shared {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

fn shared() -> Result<Shared, String> {
    let dir = tempfile::tempdir().map_err(err("tempdir"))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(err("chmod"))?;
    let exe = dir.path().join("client");
    fs::copy(std::env::current_exe().map_err(err("current_exe"))?, &exe)
        .map_err(err("copying the client"))?;
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).map_err(err("chmod"))?;
    Ok(Shared { dir, exe })
}

/// Runs the client child as `uid`/`gid` with exactly `groups`, sending
/// `line`; returns what it printed.
fn client_as(
    exe: &Path,
    socket: &Path,
    (uid, gid, groups): (u32, u32, &[u32]),
    line: &str,
) -> Result<String, String> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut command = dermascope_testkit::command(exe);
    command.env(CLIENT, socket).env(LINE, line);
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setgroups, setgid, setuid), on memory allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The child answers at once; the watchdog is its own read timeout.
    let out = command.output().map_err(err("running the client"))?;
    if !out.status.success() {
        return Err(format!(
            "the client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

fn other_user_refused() -> Result<(), String> {
    if !is_root() {
        dermascope_testkit::skip(
            "a_peer_of_another_user_is_refused",
            dermascope_testkit::Need::Hardware,
            "starting a client as another user needs root",
        );
        return Ok(());
    }
    let shared = shared()?;
    let path = shared.dir.path().join("control.sock");
    let mut trigger = ControlSocketTrigger::bind(&path).map_err(|e| e.to_string())?;
    let nobody = (NOBODY, NOBODY, &[][..]);
    // The file mode alone keeps another user out...
    let out = client_as(&shared.exe, &path, nobody, "capture")?;
    expect(
        "nobody, socket 0600",
        &out,
        "connect-error: PermissionDenied",
    )?;
    // ...and with the file opened to everyone (a chmod by hand), the peer
    // check still does.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).map_err(err("chmod"))?;
    let out = client_as(&shared.exe, &path, nobody, "shutdown")?;
    expect(
        "nobody, socket 0666",
        &out,
        &format!("error: permission denied: uid {NOBODY} is not the daemon's user"),
    )?;
    // The reply comes after the decision, so an accepted command would be
    // queued by now.
    let events = drain(&mut trigger)?;
    if !events.is_empty() {
        return Err(format!("a refused peer's command got through: {events:?}"));
    }
    Ok(())
}

fn group_member_presses() -> Result<(), String> {
    if !is_root() {
        dermascope_testkit::skip(
            "a_group_member_may_press_but_not_shut_down",
            dermascope_testkit::Need::Hardware,
            "starting a client as another user needs root",
        );
        return Ok(());
    }
    let shared = shared()?;
    let path = shared.dir.path().join("control.sock");
    let mut trigger = ControlSocketTrigger::bind_with(
        &path,
        ControlSocketOptions {
            allowed_gid: Some(PRESS_GROUP),
            ..ControlSocketOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    // A member by a supplementary group (as `usermod -aG` makes one).
    let member = (NOBODY, NOBODY, &[PRESS_GROUP][..]);
    expect(
        "supplementary member",
        client_as(&shared.exe, &path, member, "confirm bcc")?,
        "ok",
    )?;
    // A member by its primary group may press but not stop the daemon.
    let primary = (NOBODY, PRESS_GROUP, &[][..]);
    expect(
        "primary member, shutdown",
        client_as(&shared.exe, &path, primary, "shutdown")?,
        "error: permission denied: only the daemon's user or root",
    )?;
    expect(
        "primary member, capture",
        client_as(&shared.exe, &path, primary, "capture")?,
        "ok",
    )?;
    // Not a member, with the file opened by hand: refused by credentials.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).map_err(err("chmod"))?;
    expect(
        "not a member",
        client_as(&shared.exe, &path, (NOBODY, NOBODY, &[]), "capture")?,
        &format!("error: permission denied: uid {NOBODY} is neither the daemon's user nor in group {PRESS_GROUP}"),
    )?;
    let events = drain(&mut trigger)?;
    let wanted = [
        TriggerEvent::Confirm {
            label: Some("bcc".into()),
        },
        TriggerEvent::Capture,
    ];
    if events != wanted {
        return Err(format!("events {events:?}"));
    }
    // The daemon's own user (root here) may stop it.
    let mut own = Client::connect(&path)?;
    expect("own user, shutdown", own.ask("shutdown")?, "ok")?;
    expect(
        "events",
        format!("{:?}", drain(&mut trigger)?),
        "[Shutdown]",
    )
}

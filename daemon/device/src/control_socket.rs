//! Host trigger: a Unix-domain socket that stands in for the button, so a
//! PC run (or a test) can press it with `dermascope press capture` or
//! `echo capture | socat - UNIX:path`.
//!
//! Protocol: one command per line, `capture`, `confirm [label]` or
//! `shutdown`; each gets `ok` or `error: ...` back. A client that sends
//! nonsense gets an error line, never brings the listener down.
//!
//! # Who may press
//!
//! Two checks, so that neither a umask nor a chmod by hand opens the button
//! to other users:
//!
//! * The socket file. It is bound inside a fresh directory of mode 0700,
//!   given its mode there (0600, or 0660 and the allowed group when one is
//!   configured) and only then renamed to its path, so the path never names
//!   a socket with any other mode, whatever the process umask.
//! * The peer's credentials (`SO_PEERCRED` on Linux), checked on every
//!   connection before a byte is read: the daemon's own user, root, or a
//!   member of [`ControlSocketOptions::allowed_gid`] (by its effective group,
//!   or by a supplementary group as `/proc/<pid>/status` lists them). Anyone
//!   else gets `error: permission denied` and is cut off.
//!
//! `shutdown` is taken only from the daemon's user and root: a stopped daemon
//! exits 0, which a service manager may take as "stopped on purpose", so a
//! member of the allowed group can press and confirm but not stop it.
//! Elsewhere than Linux there are no peer credentials to read; the file mode
//! is then the only check.
//!
//! # Serving
//!
//! Every client has its own thread (at most
//! [`ControlSocketOptions::max_clients`] at once; one more is told `error:
//! busy` and closed), so a client that connects and says nothing never holds
//! up another. A client that sends no complete line for
//! [`ControlSocketOptions::idle_timeout`], or does not read its replies
//! within [`ControlSocketOptions::write_timeout`], is dropped. Events wait
//! for the daemon in a queue of [`ControlSocketOptions::queue_len`]; a
//! command that finds it full is refused with `error: busy`, never queued
//! without bound.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::trigger::{Trigger, TriggerError, TriggerEvent};

/// How often the listener and each client check whether the trigger is being
/// dropped (and a client whether it has been idle too long).
const POLL: Duration = Duration::from_millis(50);

/// A line longer than this is not a command; it is refused and skipped.
const MAX_LINE_BYTES: usize = 1024;

/// How the control socket serves its clients. The defaults suit a person
/// at a terminal and a test script alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSocketOptions {
    /// A group (gid) whose members may press and confirm too; the socket is
    /// then group-owned by it, mode 0660. `None`: only the daemon's user and
    /// root, mode 0600.
    pub allowed_gid: Option<u32>,
    /// Clients served at once; one more is told `error: busy` and closed.
    pub max_clients: usize,
    /// Events accepted but not yet taken by the daemon; a command that
    /// finds this many waiting is refused with `error: busy`.
    pub queue_len: usize,
    /// A client that sends no complete line for this long is dropped.
    pub idle_timeout: Duration,
    /// A reply the client does not take within this long drops the client.
    pub write_timeout: Duration,
}

impl Default for ControlSocketOptions {
    fn default() -> Self {
        Self {
            allowed_gid: None,
            max_clients: 8,
            queue_len: 16,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(2),
        }
    }
}

/// A [`Trigger`] fed by lines written to a Unix-domain socket.
#[derive(Debug)]
pub struct ControlSocketTrigger {
    path: PathBuf,
    /// Device and inode of our socket file: at drop, the path is removed only
    /// while it is still ours.
    inode: (u64, u64),
    events: Receiver<TriggerEvent>,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

impl ControlSocketTrigger {
    /// Listens on `path` with the default [`ControlSocketOptions`].
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self, TriggerError> {
        Self::bind_with(path, ControlSocketOptions::default())
    }

    /// Listens on `path` (see the module documentation for its mode and who
    /// may connect). A stale socket file left by a dead process is replaced;
    /// a live one is [`TriggerError::SocketInUse`]; any other file there is
    /// refused rather than deleted. The parent directory must exist.
    pub fn bind_with(
        path: impl Into<PathBuf>,
        options: ControlSocketOptions,
    ) -> Result<Self, TriggerError> {
        let path = path.into();
        let io_error = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| TriggerError::Io { what, source }
        };
        if options.max_clients == 0 || options.queue_len == 0 {
            return Err(TriggerError::Io {
                what: format!("control socket {}", path.display()),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "max_clients and queue_len must be at least 1",
                ),
            });
        }
        refuse_live_or_foreign(&path)?;
        let (listener, owner_uid) = bind_private(&path, options.allowed_gid)?;
        let inode = fs::symlink_metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(io_error("reading back control socket"))?;
        // Polled rather than woken by a connection of our own at drop: the
        // path may name another socket by then.
        listener
            .set_nonblocking(true)
            .map_err(io_error("configuring control socket"))?;
        let (sender, events) = mpsc::sync_channel(options.queue_len);
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let stop = Arc::clone(&stop);
            let policy = Policy {
                owner_uid,
                allowed_gid: options.allowed_gid,
            };
            thread::Builder::new()
                .name("control-socket".into())
                .spawn(move || accept_clients(listener, sender, stop, policy, options))
                .map_err(io_error("starting listener for"))?
        };
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(Self {
            path,
            inode,
            events,
            stop,
            listener: Some(listener),
        })
    }

    /// Where the socket lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Trigger for ControlSocketTrigger {
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TriggerError::Closed {
                reason: "the control socket listener stopped".into(),
            }),
        }
    }
}

impl Drop for ControlSocketTrigger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            if listener.join().is_err() {
                tracing::warn!("control socket listener panicked");
            }
        }
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Resolves `[trigger] socket_group`: a numeric gid as it is, else a group
/// name looked up in `/etc/group` (groups only a directory service knows
/// must be given by number).
pub fn socket_group_id(name_or_gid: &str) -> Result<u32, TriggerError> {
    if let Ok(gid) = name_or_gid.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").map_err(|source| TriggerError::Io {
        what: "reading /etc/group to resolve the control socket's group".into(),
        source,
    })?;
    group_in(&groups, name_or_gid).ok_or_else(|| TriggerError::UnknownGroup {
        name: name_or_gid.to_string(),
    })
}

/// The gid of `name` in the text of an `/etc/group` file.
fn group_in(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let group = fields.next()?;
        let gid = fields.nth(1)?;
        (group == name).then(|| gid.trim().parse().ok()).flatten()
    })
}

/// What is at `path` must be nothing or a dead socket.
fn refuse_live_or_foreign(path: &Path) -> Result<(), TriggerError> {
    let Ok(metadata) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(TriggerError::Io {
            what: format!("control socket {}", path.display()),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(TriggerError::SocketInUse {
            path: path.to_path_buf(),
        }),
        // Nobody listens: a socket left by a process that died.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(source) => Err(TriggerError::Io {
            what: format!(
                "checking whether another process listens on {}",
                path.display()
            ),
            source,
        }),
    }
}

/// Binds the socket in a new 0700 directory beside `path`, gives it its
/// mode (and group) there, where no other user can reach it, and renames it
/// to `path`. Returns the listener and the daemon's uid (the owner of what
/// it just created).
///
/// A umask set around `bind` would do the same, but the umask belongs to the
/// whole process: another thread creating a file meanwhile would get it.
fn bind_private(
    path: &Path,
    allowed_gid: Option<u32>,
) -> Result<(UnixListener, u32), TriggerError> {
    let io_error = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| TriggerError::Io { what, source }
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(TriggerError::Io {
            what: format!("control socket {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        });
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let private = private_dir(parent, name).map_err(io_error("creating a private folder for"))?;
    let bound = (|| {
        let staged = private.join("socket");
        let listener = UnixListener::bind(&staged)?;
        let mode = if allowed_gid.is_some() { 0o660 } else { 0o600 };
        fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
        if let Some(gid) = allowed_gid {
            std::os::unix::fs::chown(&staged, None, Some(gid))?;
        }
        let owner_uid = fs::symlink_metadata(&private)?.uid();
        fs::rename(&staged, path)?;
        Ok((listener, owner_uid))
    })();
    // Empty once the socket is renamed out; on failure the socket goes too.
    let _ = fs::remove_file(private.join("socket"));
    let _ = fs::remove_dir(&private);
    bound.map_err(io_error("binding control socket"))
}

/// A new directory of mode 0700 (whatever the umask: it can only take bits
/// away) in `parent`, named after the socket and this process.
fn private_dir(parent: &Path, name: &std::ffi::OsStr) -> io::Result<PathBuf> {
    let mut attempt = 0u32;
    loop {
        let mut dir_name = std::ffi::OsString::from(".");
        dir_name.push(name);
        dir_name.push(format!(".{}.{attempt}", std::process::id()));
        let dir = parent.join(dir_name);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left by a process of the same pid that died mid-bind, or taken
            // by another thread binding the same path.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Who is at the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
}

#[cfg(target_os = "linux")]
fn peer_of(stream: &UnixStream) -> io::Result<Option<Peer>> {
    let cred = rustix038::net::sockopt::get_socket_peercred(stream)?;
    Ok(Some(Peer {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    }))
}

#[cfg(not(target_os = "linux"))]
fn peer_of(_: &UnixStream) -> io::Result<Option<Peer>> {
    Ok(None)
}

/// What a peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Every command, `shutdown` included.
    Full,
    /// `capture` and `confirm`.
    Press,
}

#[derive(Clone, Copy, Debug)]
struct Policy {
    owner_uid: u32,
    allowed_gid: Option<u32>,
}

impl Policy {
    fn access(&self, peer: Option<Peer>) -> Result<Access, String> {
        // No credentials to read on this OS: the socket file's mode decided.
        let Some(peer) = peer else {
            return Ok(Access::Full);
        };
        if peer.uid == self.owner_uid || peer.uid == 0 {
            return Ok(Access::Full);
        }
        if let Some(gid) = self.allowed_gid {
            if peer.gid == gid || supplementary_groups(peer).is_some_and(|g| g.contains(&gid)) {
                return Ok(Access::Press);
            }
            return Err(format!(
                "permission denied: uid {} is neither the daemon's user nor in group {gid}",
                peer.uid
            ));
        }
        Err(format!(
            "permission denied: uid {} is not the daemon's user",
            peer.uid
        ))
    }
}

/// The peer's supplementary groups, from `/proc/<pid>/status`; `None` where
/// that is unreadable (hidden `/proc`) or the pid now names a process of
/// another user (the peer exited and its pid was reused).
fn supplementary_groups(peer: Peer) -> Option<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{}/status", peer.pid)).ok()?;
    groups_in_status(&status, peer.uid)
}

fn groups_in_status(status: &str, uid: u32) -> Option<Vec<u32>> {
    let mut same_user = false;
    let mut groups = None;
    for line in status.lines() {
        if let Some(uids) = line.strip_prefix("Uid:") {
            // Real, effective, saved, filesystem: SO_PEERCRED has the effective.
            same_user = uids.split_whitespace().nth(1) == Some(uid.to_string().as_str());
        } else if let Some(list) = line.strip_prefix("Groups:") {
            groups = Some(
                list.split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect(),
            );
        }
    }
    groups.filter(|_| same_user)
}

/// Decrements the count of clients being served when a client thread ends,
/// however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_clients(
    listener: UnixListener,
    events: SyncSender<TriggerEvent>,
    stop: Arc<AtomicBool>,
    policy: Policy,
    options: ControlSocketOptions,
) {
    let serving = Arc::new(AtomicUsize::new(0));
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        clients.retain(|c| !c.is_finished());
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                // Out of descriptors and the like: back off, do not spin.
                thread::sleep(POLL * 4);
                continue;
            }
        };
        if let Some(handle) = admit(client, &events, &stop, &serving, policy, &options) {
            clients.push(handle);
        }
    }
    for client in clients {
        if client.join().is_err() {
            tracing::warn!("control socket client thread panicked");
        }
    }
}

/// Checks a new connection and starts its thread; refused ones get their
/// reason and are closed here.
fn admit(
    mut client: UnixStream,
    events: &SyncSender<TriggerEvent>,
    stop: &Arc<AtomicBool>,
    serving: &Arc<AtomicUsize>,
    policy: Policy,
    options: &ControlSocketOptions,
) -> Option<JoinHandle<()>> {
    // The listener is non-blocking; on some systems its connections inherit that.
    let configured = client.set_nonblocking(false).and_then(|()| {
        client.set_write_timeout(Some(options.write_timeout))?;
        client.set_read_timeout(Some(POLL.min(options.idle_timeout)))
    });
    if let Err(error) = configured {
        tracing::debug!(%error, "control socket client dropped");
        return None;
    }
    let peer = match peer_of(&client) {
        Ok(peer) => peer,
        Err(error) => {
            tracing::warn!(%error, "control socket: peer credentials unreadable; connection refused");
            let _ = writeln!(client, "error: cannot tell who you are");
            return None;
        }
    };
    let access = match policy.access(peer) {
        Ok(access) => access,
        Err(reason) => {
            tracing::warn!(
                uid = peer.map(|p| p.uid),
                pid = peer.map(|p| p.pid),
                "control socket: refused a connection from another user"
            );
            let _ = writeln!(client, "error: {reason}");
            return None;
        }
    };
    if serving.fetch_add(1, Ordering::SeqCst) >= options.max_clients {
        serving.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(
            max = options.max_clients,
            "control socket: refused a client, too many connected"
        );
        let _ = writeln!(
            client,
            "error: busy: {} clients are connected; try again later",
            options.max_clients
        );
        return None;
    }
    let slot = Slot(Arc::clone(serving));
    let events = events.clone();
    let stop = Arc::clone(stop);
    let idle_timeout = options.idle_timeout;
    let spawned = thread::Builder::new()
        .name("control-client".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(error) = serve_client(client, access, &events, &stop, idle_timeout) {
                tracing::debug!(%error, "control socket client dropped");
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(error) => {
            // The closure, its slot and the connection are dropped with it.
            tracing::warn!(%error, "control socket: no thread for a client");
            None
        }
    }
}

fn serve_client(
    client: UnixStream,
    access: Access,
    events: &SyncSender<TriggerEvent>,
    stop: &AtomicBool,
    idle_timeout: Duration,
) -> io::Result<()> {
    let mut replies = client.try_clone()?;
    let mut reader = BufReader::new(client);
    let mut line = Vec::new();
    // After an over-long line, input is dropped up to the next newline;
    // closing instead would reset the connection before the client could
    // read why.
    let mut skipping = false;
    // Reset by each complete line only: trickling bytes does not keep a
    // client alive.
    let mut last_line = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A read timeout leaves the partial line in `line`; keep it.
        let budget = (MAX_LINE_BYTES + 1).saturating_sub(line.len()) as u64;
        match (&mut reader).take(budget).read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if skipping => {
                skipping = !line.ends_with(b"\n");
                line.clear();
                last_line = Instant::now();
            }
            Ok(_) if line.len() > MAX_LINE_BYTES && !line.ends_with(b"\n") => {
                tracing::warn!("control socket: rejected an over-long line");
                writeln!(replies, "error: line longer than {MAX_LINE_BYTES} bytes")?;
                skipping = true;
                line.clear();
            }
            Ok(_) => {
                // Without a newline read_until stopped at end of stream: the
                // client sent its last command without one (`printf capture`).
                let at_end = !line.ends_with(b"\n");
                let reply = match parse_command(&line) {
                    Ok(None) => None,
                    Ok(Some(TriggerEvent::Shutdown)) if access != Access::Full => {
                        tracing::warn!("control socket: refused a shutdown from a group member");
                        Some(
                            "error: permission denied: only the daemon's user or root may shut \
                             it down"
                                .to_string(),
                        )
                    }
                    Ok(Some(event)) => match events.try_send(event) {
                        Ok(()) => Some("ok".to_string()),
                        Err(TrySendError::Full(_)) => {
                            tracing::warn!("control socket: refused a command, the queue is full");
                            Some(
                                "error: busy: earlier commands are still waiting for the daemon; \
                                 try again"
                                    .to_string(),
                            )
                        }
                        Err(TrySendError::Disconnected(_)) => return Ok(()),
                    },
                    Err(message) => {
                        tracing::warn!("control socket: rejected a malformed command");
                        Some(format!("error: {message}"))
                    }
                };
                if let Some(reply) = reply {
                    writeln!(replies, "{reply}")?;
                }
                line.clear();
                last_line = Instant::now();
                if at_end {
                    return Ok(());
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if last_line.elapsed() >= idle_timeout {
                    tracing::debug!("control socket: dropped an idle client");
                    writeln!(
                        replies,
                        "error: no command for {} s; closing",
                        idle_timeout.as_secs_f64()
                    )?;
                    return Ok(());
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// Parses one line: `Ok(None)` for a blank line, `Err` with a message for
/// the client when it is not a command.
fn parse_command(line: &[u8]) -> Result<Option<TriggerEvent>, String> {
    let line = std::str::from_utf8(line)
        .map_err(|_| "command is not UTF-8 text".to_string())?
        .trim();
    if line.is_empty() {
        return Ok(None);
    }
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (line, ""),
    };
    let event = match (word.to_ascii_lowercase().as_str(), rest) {
        ("capture", "") => TriggerEvent::Capture,
        ("shutdown", "") => TriggerEvent::Shutdown,
        ("confirm", "") => TriggerEvent::Confirm { label: None },
        ("confirm", label) => TriggerEvent::Confirm {
            label: Some(label.to_string()),
        },
        ("capture" | "shutdown", _) => return Err(format!("'{word}' takes no argument")),
        _ => {
            return Err(format!(
                "unknown command '{word}'; expected capture, confirm [label] or shutdown"
            ))
        }
    };
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command(b"capture\n"), Ok(Some(TriggerEvent::Capture)));
        assert_eq!(
            parse_command(b"  SHUTDOWN \r\n"),
            Ok(Some(TriggerEvent::Shutdown))
        );
        assert_eq!(
            parse_command(b"confirm\n"),
            Ok(Some(TriggerEvent::Confirm { label: None }))
        );
        assert_eq!(
            parse_command(b"confirm  basal cell \n"),
            Ok(Some(TriggerEvent::Confirm {
                label: Some("basal cell".into())
            }))
        );
        assert_eq!(parse_command(b"\n"), Ok(None));
        assert!(parse_command(b"capture now\n").is_err());
        assert!(parse_command(b"snap\n")
            .unwrap_err()
            .contains("unknown command 'snap'"));
        assert!(parse_command(&[0xff, 0xfe, b'\n']).is_err());
    }

    #[test]
    fn the_policy_lets_the_owner_root_and_the_group_in() {
        let peer = |uid, gid| {
            Some(Peer {
                // No such process: only the primary group counts.
                pid: i32::MAX,
                uid,
                gid,
            })
        };
        let alone = Policy {
            owner_uid: 1000,
            allowed_gid: None,
        };
        assert_eq!(alone.access(peer(1000, 1000)), Ok(Access::Full));
        assert_eq!(alone.access(peer(0, 0)), Ok(Access::Full));
        assert!(alone
            .access(peer(1001, 1000))
            .unwrap_err()
            .contains("uid 1001"));
        let shared = Policy {
            allowed_gid: Some(2000),
            ..alone
        };
        assert_eq!(shared.access(peer(1001, 2000)), Ok(Access::Press));
        assert!(shared.access(peer(1001, 1001)).is_err());
        assert_eq!(shared.access(None), Ok(Access::Full));
    }

    #[test]
    fn groups_come_from_status_only_for_the_same_user() {
        let status = "Name:\tsh\nUid:\t1001\t1001\t1001\t1001\nGid:\t1001\t1001\t1001\t1001\n\
                      Groups:\t27 2000 \n";
        assert_eq!(groups_in_status(status, 1001), Some(vec![27, 2000]));
        // A reused pid now run by another user says nothing of the peer.
        assert_eq!(groups_in_status(status, 1002), None);
        assert_eq!(
            groups_in_status("Uid:\t1001\t1001\t1001\t1001\n", 1001),
            None
        );
    }

    #[test]
    fn group_names_resolve_from_a_group_file() {
        let groups = "root:x:0:\n# comment\nbroken\ndermascope-press:x:1234:alice,bob\n";
        assert_eq!(group_in(groups, "dermascope-press"), Some(1234));
        assert_eq!(group_in(groups, "root"), Some(0));
        assert_eq!(group_in(groups, "press"), None);
        assert_eq!(socket_group_id("4321").unwrap(), 4321);
    }
}

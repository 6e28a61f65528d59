//! Host trigger: a Unix-domain socket that stands in for the button, so a
//! PC run (or a test) can press it with `echo capture | socat - UNIX:path`.
//!
//! Protocol: one command per line, `capture`, `confirm [label]` or
//! `shutdown`; each gets `ok` or `error: ...` back. Clients are served one
//! after another; a client that sends nonsense gets an error line, never
//! brings the listener down.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::trigger::{Trigger, TriggerError, TriggerEvent};

/// How often an idle client connection checks whether the trigger is being
/// dropped.
const CLIENT_POLL: Duration = Duration::from_millis(200);

/// A line longer than this is not a command; the client is cut off.
const MAX_LINE_BYTES: usize = 1024;

/// A [`Trigger`] fed by lines written to a Unix-domain socket.
#[derive(Debug)]
pub struct ControlSocketTrigger {
    path: PathBuf,
    events: Receiver<TriggerEvent>,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

impl ControlSocketTrigger {
    /// Listens on `path` (mode 0600). A stale socket file left by a dead
    /// process is replaced; a live one is [`TriggerError::SocketInUse`]; any
    /// other file there is refused rather than deleted.
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self, TriggerError> {
        let path = path.into();
        let io_error = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| TriggerError::Io { what, source }
        };
        if let Ok(metadata) = fs::symlink_metadata(&path) {
            if !metadata.file_type().is_socket() {
                return Err(TriggerError::Io {
                    what: format!("control socket {}", path.display()),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a file that is not a socket is in the way",
                    ),
                });
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(TriggerError::SocketInUse { path });
            }
            fs::remove_file(&path).map_err(io_error("removing stale control socket"))?;
        }
        let listener = UnixListener::bind(&path).map_err(io_error("binding control socket"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(io_error("restricting control socket"))?;
        let (sender, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("control-socket".into())
                .spawn(move || accept_clients(listener, sender, stop))
                .map_err(io_error("starting listener for"))?
        };
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(Self {
            path,
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
        // accept() has no timeout: a connection of our own wakes it up.
        let _ = UnixStream::connect(&self.path);
        if let Some(listener) = self.listener.take() {
            if listener.join().is_err() {
                tracing::warn!("control socket listener panicked");
            }
        }
        let _ = fs::remove_file(&self.path);
    }
}

fn accept_clients(listener: UnixListener, events: Sender<TriggerEvent>, stop: Arc<AtomicBool>) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match client {
            Ok(client) => {
                if let Err(error) = serve_client(client, &events, &stop) {
                    tracing::debug!(%error, "control socket client dropped");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                // Out of descriptors and the like: back off, do not spin.
                thread::sleep(CLIENT_POLL);
            }
        }
    }
}

fn serve_client(
    client: UnixStream,
    events: &Sender<TriggerEvent>,
    stop: &AtomicBool,
) -> io::Result<()> {
    client.set_read_timeout(Some(CLIENT_POLL))?;
    let mut replies = client.try_clone()?;
    let mut reader = BufReader::new(client);
    let mut line = Vec::new();
    // After an over-long line, input is dropped up to the next newline;
    // closing instead would reset the connection before the client could
    // read why.
    let mut skipping = false;
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
                    Ok(Some(event)) => {
                        if events.send(event).is_err() {
                            return Ok(());
                        }
                        Some("ok".to_string())
                    }
                    Err(message) => {
                        tracing::warn!("control socket: rejected a malformed command");
                        Some(format!("error: {message}"))
                    }
                };
                if let Some(reply) = reply {
                    writeln!(replies, "{reply}")?;
                }
                line.clear();
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
                ) => {}
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
}

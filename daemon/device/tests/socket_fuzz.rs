//! Fuzz target `control-socket`: the control socket's line protocol, from a
//! client's side (its parser is private to the socket; this drives it
//! through the public `ControlSocketTrigger`, framing included). Seeds are
//! in `fuzz/corpus/control-socket/`; the harness is
//! `dermascope_testkit::fuzz`.
//!
//! Each input is sent on one connection, followed by a newline and a marker
//! command. Invariants: the listener survives every input; each command line
//! gets exactly the reply and the event a model of the protocol predicts
//! (lines of at most 1024 bytes, one reply per non-blank line, an over-long
//! line refused once and skipped to its newline, a full queue answered
//! `busy`); nothing else reaches the daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use dermascope_device::{ControlSocketTrigger, Trigger, TriggerEvent};
use dermascope_testkit::fuzz::proptest::prelude::*;
use dermascope_testkit::fuzz::{self, Fuzzer, TrackingAllocator};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "control-socket";
const MAX_LINE: usize = 1024;
/// ControlSocketOptions::default().queue_len: events waiting for the daemon.
const QUEUE: usize = 16;
/// Watchdog for a reply that never comes, not a timing claim.
const NO_REPLY: Duration = Duration::from_secs(20);
const TOKENS: &[&[u8]] = &[
    b"capture",
    b"confirm",
    b"shutdown",
    b" ",
    b"\t",
    b"\n",
    b"\r\n",
    b"\r",
    b"\xc2\xa0",
    b"\xe3\x80\x80",
    b"\xff",
    b"\x00",
    b"mel",
];

#[derive(Debug, PartialEq)]
enum Reply {
    Ok,
    Error,
}

/// The protocol as documented, written apart from the socket's own parser.
fn command(line: &[u8]) -> Option<Result<TriggerEvent, ()>> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Some(Err(()));
    };
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let word_end = text.find(char::is_whitespace).unwrap_or(text.len());
    let (word, rest) = (&text[..word_end], text[word_end..].trim());
    Some(
        match (word.to_ascii_lowercase().as_str(), rest.is_empty()) {
            ("capture", true) => Ok(TriggerEvent::Capture),
            ("shutdown", true) => Ok(TriggerEvent::Shutdown),
            ("confirm", true) => Ok(TriggerEvent::Confirm { label: None }),
            ("confirm", false) => Ok(TriggerEvent::Confirm {
                label: Some(rest.to_string()),
            }),
            _ => Err(()),
        },
    )
}

/// Replies and events for `stream`, all of it sent on one connection that
/// stays open.
fn model(stream: &[u8]) -> (Vec<Reply>, Vec<TriggerEvent>) {
    let (mut replies, mut events) = (Vec::new(), Vec::new());
    let mut rest = stream;
    while !rest.is_empty() {
        let window = &rest[..rest.len().min(MAX_LINE + 1)];
        match window.iter().position(|&b| b == b'\n') {
            Some(end) => {
                match command(&window[..=end]) {
                    None => {}
                    Some(Err(())) => replies.push(Reply::Error),
                    Some(Ok(_)) if events.len() >= QUEUE => replies.push(Reply::Error),
                    Some(Ok(event)) => {
                        replies.push(Reply::Ok);
                        events.push(event);
                    }
                }
                rest = &rest[end + 1..];
            }
            None if window.len() > MAX_LINE => {
                replies.push(Reply::Error);
                rest = match rest.iter().position(|&b| b == b'\n') {
                    Some(end) => &rest[end + 1..],
                    None => &[],
                };
            }
            // A partial line: the caller always ends the stream with a newline.
            None => unreachable!("the stream ends with a newline"),
        }
    }
    (replies, events)
}

struct Server {
    trigger: ControlSocketTrigger,
    client: UnixStream,
    replies: BufReader<UnixStream>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trigger = ControlSocketTrigger::bind(dir.path().join("control.sock")).unwrap();
        let client = UnixStream::connect(trigger.path()).unwrap();
        client.set_read_timeout(Some(NO_REPLY)).unwrap();
        let replies = BufReader::new(client.try_clone().unwrap());
        Server {
            trigger,
            client,
            replies,
            _dir: dir,
        }
    }

    fn session(&mut self, input: &[u8]) -> Result<(), String> {
        let mut stream = input.to_vec();
        stream.extend_from_slice(b"\nconfirm end-of-input\n");
        let (expected_replies, expected_events) = model(&stream);
        self.client
            .write_all(&stream)
            .map_err(|e| format!("sending failed (the listener died?): {e}"))?;
        let mut replies = Vec::new();
        for _ in 0..expected_replies.len() {
            let mut line = String::new();
            self.replies
                .read_line(&mut line)
                .map_err(|e| format!("no reply after {replies:?}: {e}"))?;
            replies.push(match line.as_str() {
                "ok\n" => Reply::Ok,
                l if l.starts_with("error: ") && l.ends_with('\n') => Reply::Error,
                other => return Err(format!("reply {other:?} after {replies:?}")),
            });
        }
        if replies != expected_replies {
            return Err(format!(
                "replies {replies:?}, the protocol says {expected_replies:?}"
            ));
        }
        // Every event was queued before its reply was written.
        let mut events = Vec::new();
        while let Some(event) = self
            .trigger
            .wait(Duration::ZERO)
            .map_err(|e| e.to_string())?
        {
            events.push(event);
        }
        if events != expected_events {
            return Err(format!(
                "events {events:?}, the protocol says {expected_events:?}"
            ));
        }
        Ok(())
    }
}

fn generated_sessions() -> impl Strategy<Value = Vec<u8>> {
    let word = prop::sample::select(vec![
        "capture", "CONFIRM", "confirm", "shutdown", "Capture", "snap", "",
    ]);
    let space = prop::sample::select(vec!["", " ", "  ", "\t", "\r", "\u{a0}", "\u{3000}"]);
    let label = prop_oneof![
        Just(String::new()),
        "[a-z]{1,8}( [a-z]{1,8})?",
        any::<String>().prop_map(|s| s.replace('\n', "")),
        (1000usize..1100).prop_map(|n| "l".repeat(n)),
    ];
    let line = (
        space.clone(),
        word,
        space.clone(),
        label,
        space,
        prop::sample::select(vec!["\n", "\r\n"]),
    )
        .prop_map(|(a, w, b, l, c, end)| format!("{a}{w}{b}{l}{c}{end}"));
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.concat().into_bytes())
}

#[test]
fn the_model_reads_the_seeds_as_the_protocol_says() {
    let (replies, events) =
        model(b"  CAPTURE \r\nconfirm  basal cell \n\nsnap\ncapture now\nshutdown\n");
    assert_eq!(
        replies,
        [Reply::Ok, Reply::Ok, Reply::Error, Reply::Error, Reply::Ok]
    );
    assert_eq!(
        events,
        [
            TriggerEvent::Capture,
            TriggerEvent::Confirm {
                label: Some("basal cell".into())
            },
            TriggerEvent::Shutdown
        ]
    );
    let mut long = vec![b'x'; MAX_LINE + 76];
    long.extend_from_slice(b"\ncapture\n");
    assert_eq!(model(&long).0, [Reply::Error, Reply::Ok]);
}

#[test]
fn fuzz_control_socket() {
    let seeds = fuzz::seeds(TARGET);
    let server = std::cell::RefCell::new(Server::start());
    let mut fuzzer = Fuzzer::new(TARGET);
    fuzzer.check("mutants", fuzz::mutants(seeds, TOKENS), |m| {
        server.borrow_mut().session(&m.bytes)
    });
    fuzzer.check("random-bytes", fuzz::random_bytes(2048), |b| {
        server.borrow_mut().session(&b)
    });
    fuzzer.check("generated-sessions", generated_sessions(), |s| {
        server.borrow_mut().session(&s)
    });
    fuzzer.finish();
    // Still serving a new client after all of that.
    let mut server = server.into_inner();
    let mut other = UnixStream::connect(server.trigger.path()).unwrap();
    other.write_all(b"capture\n").unwrap();
    let mut reply = String::new();
    other.set_read_timeout(Some(NO_REPLY)).unwrap();
    BufReader::new(&other).read_line(&mut reply).unwrap();
    assert_eq!(reply, "ok\n");
    assert_eq!(
        server.trigger.wait(NO_REPLY).unwrap(),
        Some(TriggerEvent::Capture)
    );
}

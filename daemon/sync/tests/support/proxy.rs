//! A loopback HTTP/1.1 proxy in front of the service that can break one
//! exchange on purpose: drop the answer after the service sent it, hold a
//! request until the test releases it, or answer in the service's place
//! (a 500, garbage, an oversized body). Every exchange is logged so a test
//! can wait on what happened instead of on a clock.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::WATCHDOG;

/// What to do with a matching request instead of forwarding it.
#[derive(Clone, Debug)]
pub enum Action {
    /// Forward it, read the service's whole answer, then close the
    /// device's connection without sending a byte of it.
    DropAnswer,
    /// Do not forward; hold the connection until [`Proxy::release`], then
    /// close it.
    Hold,
    /// Answer these raw bytes (a whole HTTP response) in the service's
    /// place, then close the connection.
    Answer(Vec<u8>),
    /// Answer 200 with a chunked body of this many bytes of JSON-ish
    /// filler (no Content-Length), then close.
    Flood(usize),
    /// Forward it, then pass on the service's head and only the first
    /// this many bytes of its body, and close: a download cut mid-way.
    Cut(usize),
    /// Forward it and pass the answer on with one byte of its body
    /// flipped: a download damaged on the way.
    Corrupt,
}

impl Action {
    pub fn json(status: u16, body: &str) -> Action {
        Action::Answer(
            format!(
                "HTTP/1.1 {status} Injected\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }

    /// Announces a body of `length` bytes and sends none of it.
    pub fn announce(length: u64) -> Action {
        Action::Answer(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\
                 connection: close\r\n\r\n"
            )
            .into_bytes(),
        )
    }
}

struct Fault {
    method: &'static str,
    path: &'static str,
    action: Action,
    /// Matching requests to let through before the fault applies.
    skip: usize,
    times: usize,
}

/// One request the proxy saw and what became of it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// `GET /v1/cases?model_id=...`
    pub request_line: String,
    /// The request's header lines as sent, `name: value` each.
    pub request_head: Vec<String>,
    /// The service's status, when it was forwarded and answered.
    pub status: Option<u16>,
    /// The device's request body.
    pub request: Vec<u8>,
    /// The service's answer body, when forwarded.
    pub body: Vec<u8>,
    /// The fault applied, if any.
    pub fault: Option<String>,
}

impl Exchange {
    /// A request header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request_head.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    pub fn is(&self, method: &str, path: &str) -> bool {
        let mut parts = self.request_line.split(' ');
        parts.next() == Some(method)
            && parts
                .next()
                .is_some_and(|target| target.split('?').next() == Some(path))
    }
}

#[derive(Default)]
struct State {
    upstream: Option<SocketAddr>,
    faults: Vec<Fault>,
    log: Vec<Exchange>,
    held: usize,
    released: bool,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                upstream: Some(upstream),
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let shared = Arc::clone(&inner);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve(client, &shared));
            }
        });
        Proxy { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where requests go from now on (a restarted service).
    pub fn retarget(&self, upstream: SocketAddr) {
        self.inner.lock().upstream = Some(upstream);
    }

    /// The next `times` requests `method path` get `action`.
    pub fn fault(&self, method: &'static str, path: &'static str, action: Action, times: usize) {
        self.fault_after(method, path, 0, action, times);
    }

    /// [`Proxy::fault`] once `skip` matching requests have gone through.
    pub fn fault_after(
        &self,
        method: &'static str,
        path: &'static str,
        skip: usize,
        action: Action,
        times: usize,
    ) {
        self.inner.lock().faults.push(Fault {
            method,
            path,
            action,
            skip,
            times,
        });
    }

    /// Lets every held request go (closed unanswered).
    pub fn release(&self) {
        self.inner.lock().released = true;
        self.inner.changed.notify_all();
    }

    pub fn log(&self) -> Vec<Exchange> {
        self.inner.lock().log.clone()
    }

    /// Waits until `held` requests are being held.
    pub fn wait_held(&self, held: usize) {
        self.wait(&format!("{held} held request(s)"), |s| s.held >= held);
    }

    /// Waits until the log satisfies `done`.
    pub fn wait_log(&self, what: &str, done: impl Fn(&[Exchange]) -> bool) {
        self.wait(what, |s| done(&s.log));
    }

    fn wait(&self, what: &str, done: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + WATCHDOG;
        let mut state = self.inner.lock();
        while !done(&state) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "watchdog ({WATCHDOG:?}, a hang, not a timing claim): the proxy never saw {what}"
            );
            state = self
                .inner
                .changed
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn record(inner: &Inner, exchange: Exchange) {
    inner.lock().log.push(exchange);
    inner.changed.notify_all();
}

/// An exchange the service never answered: held, answered by the proxy
/// itself, or flooded.
fn record_unanswered(inner: &Inner, request: &Message, fault: Option<String>) {
    record(
        inner,
        Exchange {
            request: request.body.clone(),
            request_line: request.first_line.clone(),
            request_head: request.headers.clone(),
            status: None,
            body: Vec::new(),
            fault,
        },
    );
}

fn serve(client: TcpStream, inner: &Inner) {
    let Ok(client_write) = client.try_clone() else {
        return;
    };
    let mut client_write = client_write;
    let mut from_client = BufReader::new(client);
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        let Some(request) = read_message(&mut from_client, false) else {
            return;
        };
        let request_line = request.first_line.clone();
        let action = {
            let mut state = inner.lock();
            let mut chosen = None;
            for f in state.faults.iter_mut() {
                if f.times == 0 || !line_is(&request_line, f.method, f.path) {
                    continue;
                }
                if f.skip > 0 {
                    f.skip -= 1;
                    continue;
                }
                f.times -= 1;
                chosen = Some(f.action.clone());
                break;
            }
            chosen
        };
        let fault = action
            .as_ref()
            .map(|a| format!("{a:?}").chars().take(40).collect());
        match action {
            None | Some(Action::DropAnswer | Action::Cut(_) | Action::Corrupt) => {
                if upstream.is_none() {
                    let target = inner.lock().upstream;
                    let Some(target) = target else { return };
                    let Ok(stream) = TcpStream::connect(target) else {
                        return;
                    };
                    let Ok(reader) = stream.try_clone() else {
                        return;
                    };
                    upstream = Some((stream, BufReader::new(reader)));
                }
                let Some((to_service, from_service)) = upstream.as_mut() else {
                    return;
                };
                if to_service.write_all(&request.raw).is_err() {
                    return;
                }
                let Some(response) = read_message(from_service, true) else {
                    return;
                };
                let status = response
                    .first_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok());
                record(
                    inner,
                    Exchange {
                        request: request.body.clone(),
                        request_line,
                        request_head: request.headers.clone(),
                        status,
                        body: response.body.clone(),
                        fault,
                    },
                );
                let mut raw = response.raw;
                match action {
                    Some(Action::DropAnswer) => {
                        let _ = client_write.shutdown(Shutdown::Both);
                        return;
                    }
                    Some(Action::Cut(n)) => {
                        let end = (response.head_len + n).min(raw.len());
                        let _ = client_write.write_all(&raw[..end]);
                        let _ = client_write.flush();
                        let _ = client_write.shutdown(Shutdown::Both);
                        return;
                    }
                    Some(Action::Corrupt) if raw.len() > response.head_len => {
                        let at = response.head_len + (raw.len() - response.head_len) / 2;
                        raw[at] ^= 0x5a;
                    }
                    _ => {}
                }
                if client_write.write_all(&raw).is_err() {
                    return;
                }
            }
            Some(Action::Hold) => {
                record_unanswered(inner, &request, fault);
                let mut state = inner.lock();
                state.held += 1;
                inner.changed.notify_all();
                while !state.released {
                    state = inner.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                drop(state);
                let _ = client_write.shutdown(Shutdown::Both);
                return;
            }
            Some(Action::Answer(bytes)) => {
                record_unanswered(inner, &request, fault);
                let _ = client_write.write_all(&bytes);
                let _ = client_write.flush();
                let _ = client_write.shutdown(Shutdown::Both);
                return;
            }
            Some(Action::Flood(total)) => {
                record_unanswered(inner, &request, fault);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                if client_write.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 1 << 20];
                let mut sent = 0;
                while sent < total {
                    let n = chunk.len().min(total - sent);
                    let framed = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
                    if client_write.write_all(&framed).is_err() {
                        // The device stopped reading: that is the point.
                        return;
                    }
                    sent += n;
                }
                let _ = client_write.write_all(b"0\r\n\r\n");
                let _ = client_write.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn line_is(line: &str, method: &str, path: &str) -> bool {
    Exchange {
        request: Vec::new(),
        request_line: line.to_owned(),
        request_head: Vec::new(),
        status: None,
        body: Vec::new(),
        fault: None,
    }
    .is(method, path)
}

struct Message {
    first_line: String,
    /// Header lines, as received.
    headers: Vec<String>,
    /// Bytes of `raw` before the body.
    head_len: usize,
    /// The whole message as received, to pass on unchanged.
    raw: Vec<u8>,
    /// The body, de-chunked.
    body: Vec<u8>,
}

/// One HTTP/1.1 message (request or response); `None` at EOF or on a
/// framing the proxy does not handle.
fn read_message(from: &mut impl BufRead, response: bool) -> Option<Message> {
    let mut raw = Vec::new();
    let mut first_line = String::new();
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if from.read_line(&mut line).ok()? == 0 {
            return None;
        }
        raw.extend_from_slice(line.as_bytes());
        let trimmed = line.trim_end();
        if first_line.is_empty() {
            first_line = trimmed.to_owned();
            continue;
        }
        if trimmed.is_empty() {
            break;
        }
        headers.push(trimmed.to_owned());
        let (name, value) = trimmed.split_once(':')?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse().ok();
        } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let head_len = raw.len();
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            if from.read_line(&mut size_line).ok()? == 0 {
                return None;
            }
            raw.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            from.read_exact(&mut chunk).ok()?;
            raw.extend_from_slice(&chunk);
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = length {
        body = vec![0; n];
        from.read_exact(&mut body).ok()?;
        raw.extend_from_slice(&body);
    } else if response {
        let status: u16 = first_line.split(' ').nth(1)?.parse().ok()?;
        if status != 204 && status != 304 {
            from.read_to_end(&mut body).ok()?;
            raw.extend_from_slice(&body);
        }
    }
    Some(Message {
        first_line,
        headers,
        head_len,
        raw,
        body,
    })
}

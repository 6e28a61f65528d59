//! Debian's chromium, headless, driven through the DevTools protocol over
//! `--remote-debugging-pipe`: requests and answers are JSON texts ended by
//! a NUL byte on file descriptors 3 (to the browser) and 4 (from it).
//!
//! A pipe rather than a WebSocket crate or headless_chrome: it needs no new
//! dependency (Cargo.lock has no WebSocket client), no port to find or
//! race for, and the browser's end closes with the process.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{json, Value};

/// A hang watchdog for one protocol exchange or one page load, not a
/// timing claim: each takes well under a second unless something is stuck.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// The system's chromium, if installed.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DERMASCOPE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    next_id: u64,
    events: VecDeque<Value>,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromium with a fresh profile and opens one page (a tab) of
    /// `width` x `height` CSS pixels.
    pub fn launch(binary: &Path, width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let (child_in, to) = std::io::pipe().expect("pipe");
        let (from, child_out) = std::io::pipe().expect("pipe");
        let (in_fd, out_fd) = (child_in.as_raw_fd(), child_out.as_raw_fd());
        let mut command = Command::new(binary);
        command
            .args([
                "--headless",
                // The tests run as root, where chromium's sandbox cannot
                // start; the pages are the test's own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--mute-audio",
                "--hide-scrollbars",
                "--font-render-hinting=none",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec. The pipe ends are first moved above 100 so that putting
        // one at 3 cannot overwrite the other; dup2 clears close-on-exec on
        // the copy.
        unsafe {
            command.pre_exec(move || {
                let a = libc::fcntl(in_fd, libc::F_DUPFD_CLOEXEC, 100);
                let b = libc::fcntl(out_fd, libc::F_DUPFD_CLOEXEC, 100);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        drop(child_in);
        drop(child_out);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if message.last() == Some(&0) {
                            message.pop();
                        }
                        let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                            continue;
                        };
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to,
            from: rx,
            next_id: 0,
            events: VecDeque::new(),
            session: String::new(),
            _profile: profile,
        };
        let target = browser.browser_call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = browser.browser_call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        browser.call("Page.enable", json!({}));
        browser.call("Network.enable", json!({}));
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser
    }

    fn send(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        loop {
            let value = match self.from.recv_timeout(WATCHDOG) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => panic!("watchdog: no answer to {method}"),
                Err(RecvTimeoutError::Disconnected) => panic!("chromium closed during {method}"),
            };
            if value["id"].as_u64() == Some(id) {
                if let Some(error) = value.get("error") {
                    panic!("{method}: {error}");
                }
                return value["result"].clone();
            }
            self.events.push_back(value);
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A protocol command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(&session))
    }

    /// Waits for the page's next `method` event.
    pub fn wait_event(&mut self, method: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i).expect("event");
        }
        loop {
            let value = match self.from.recv_timeout(WATCHDOG) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => panic!("watchdog: no {method} event"),
                Err(RecvTimeoutError::Disconnected) => panic!("chromium closed awaiting {method}"),
            };
            if value["method"] == method {
                return value;
            }
            self.events.push_back(value);
        }
    }

    fn forget(&mut self, method: &str) {
        self.events.retain(|e| e["method"] != method);
    }

    /// Runs `action` and waits for the page load it causes.
    fn loading(&mut self, action: impl FnOnce(&mut Browser)) {
        self.forget("Page.loadEventFired");
        action(self);
        self.wait_event("Page.loadEventFired");
    }

    /// Loads `url` and waits for it.
    pub fn goto(&mut self, url: &str) {
        self.loading(|b| {
            let nav = b.call("Page.navigate", json!({ "url": url }));
            assert!(nav.get("errorText").is_none(), "navigating to {url}: {nav}");
        });
    }

    /// Reloads the page, as the operator's F5 or the page's own refresh.
    pub fn reload(&mut self) {
        self.loading(|b| {
            b.call("Page.reload", json!({ "ignoreCache": true }));
        });
    }

    /// Evaluates `expression` in the page, as the page's own script would
    /// run it, and returns its JSON value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let reply = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = reply.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        reply["result"]["value"].clone()
    }

    pub fn text(&mut self, selector: &str) -> String {
        let v = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.innerText : null; }})()",
            json!(selector)
        ));
        v.as_str()
            .unwrap_or_else(|| panic!("no element {selector} on {}", self.url()))
            .to_string()
    }

    pub fn url(&mut self) -> String {
        self.eval("location.href")
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Clicks the middle of the element, with the mouse.
    fn click_at(&mut self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const r = document.querySelector({}).getBoundingClientRect(); \
               return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Clicks an element that submits a form or follows a link, and waits
    /// for the page it leads to.
    pub fn click_and_wait(&mut self, selector: &str) {
        self.loading(|b| b.click_at(selector));
    }

    /// Focuses an input and types `text` into it, as a keyboard would.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.value = ''; }})()",
            json!(selector)
        ));
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// Every cookie the browser holds for `url`.
    pub fn cookies(&mut self, url: &str) -> Vec<Value> {
        let v = self.call("Network.getCookies", json!({ "urls": [url] }));
        v["cookies"].as_array().cloned().unwrap_or_default()
    }

    /// A PNG of the whole page (grown to its full height).
    pub fn screenshot(&mut self, width: u32) -> Vec<u8> {
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .as_u64()
            .unwrap_or(800);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let mut bytes =
            serde_json::to_vec(&json!({ "id": 0, "method": "Browser.close" })).unwrap_or_default();
        bytes.push(0);
        let _ = self.to.write_all(&bytes);
        // Browser.close normally ends it within a moment; a kill after a
        // bounded wait (a watchdog) makes sure.
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

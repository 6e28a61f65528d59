//! What the process tests of `privacy.rs` and `notify.rs` share.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `dermascope` with the test bundle, logging at debug level without colour
/// codes (which would split the words a test looks for).
pub fn dermascope() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dermascope"));
    command
        .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1");
    command
}

/// A process whose output is read while it runs: at debug level it writes
/// more than a pipe holds, and would block on a full one.
pub struct Running {
    pub child: Child,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Running {
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        }
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the exit, killing the process at `deadline` (a watchdog).
    pub fn finish(mut self, deadline: Instant) -> Output {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("watchdog: the process did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Output {
            status,
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        }
    }
}

//! What the process tests of the binary share: the binary with the test
//! bundle, a process read while it runs, synthetic photographs and
//! libraries, and the daemon's configuration on the host stand-ins.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
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

/// `dermascope ARGS` at warn level without the test bundle's environment,
/// run to its end: the one-shot commands (`update`, `press`, `cases`).
pub fn dermascope_once(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run dermascope")
}

/// A test path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
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

/// A pigmented blob on skin-coloured background; `hue` separates the
/// synthetic "diagnoses" so that retrieval has something to find.
pub fn synthetic_lesion(seed: u32, hue: [u8; 3]) -> image::RgbImage {
    let cx = 90.0 + (seed % 7) as f32 * 4.0;
    let cy = 70.0 + (seed % 5) as f32 * 3.0;
    let radius = 35.0 + (seed % 11) as f32 * 2.0;
    image::RgbImage::from_fn(200, 150, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < radius {
            let fade = 0.6 + 0.4 * d / radius;
            image::Rgb(hue.map(|c| (c as f32 * fade) as u8))
        } else {
            image::Rgb([225, 170 + (x % 9) as u8, 150 + (y % 7) as u8])
        }
    })
}

pub const HUES: [(&str, [u8; 3]); 3] = [
    ("nv", [120, 70, 40]),
    ("mel", [40, 25, 30]),
    ("vasc", [170, 30, 50]),
];

/// `per_class` synthetic photographs per diagnosis in `dir/images`, named
/// `<prefix>_<class><index>.jpg`, and their labels file (class by class);
/// returns the file and the case ids in its order.
pub fn synthetic_library(dir: &Path, per_class: u32, prefix: &str) -> (PathBuf, Vec<String>) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut csv = String::from("image,label,lesion_id,dx_type,age,sex,anatom_site\n");
    let mut ids = Vec::new();
    for (class, (label, hue)) in HUES.iter().enumerate() {
        for i in 0..per_class {
            let id = format!("{prefix}_{class}{i:03}");
            synthetic_lesion(i * 3 + class as u32, *hue)
                .save(images.join(format!("{id}.jpg")))
                .unwrap();
            csv.push_str(&format!(
                "{id}.jpg,{label},L{class}{i},histo,45,female,back\n"
            ));
            ids.push(id);
        }
    }
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, csv).unwrap();
    (labels, ids)
}

/// Where a daemon started by [`daemon_config`] listens and draws.
pub struct HostDaemon {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub screens: PathBuf,
}

/// `dir/dermascope.toml` for `dermascope run` on the host stand-ins: a
/// replay camera of three synthetic frames, the control socket, PNG
/// screens, the store at `store`, no adapter, and a quality gate that
/// takes the synthetic frames.
pub fn daemon_config(dir: &Path, store: &Path) -> HostDaemon {
    let replay = dir.join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    for i in 0..3 {
        synthetic_lesion(100 + i, [110, 60, 40])
            .save(replay.join(format!("frame{i}.png")))
            .unwrap();
    }
    let socket = dir.join("control.sock");
    let screens = dir.join("screens");
    let config = dir.join("dermascope.toml");
    std::fs::write(
        &config,
        format!(
            "[camera]\nreplay_dir = {replay:?}\n[trigger]\nsocket = {socket:?}\n\
             [display]\npng_dir = {screens:?}\n[store]\ndir = {store:?}\n\
             [adapter]\ndir = {adapter:?}\n[quality]\nmin_focus = 0.0\nmin_lesion_contrast = 0.0\n",
            adapter = dir.join("no-adapter"),
        ),
    )
    .unwrap();
    HostDaemon {
        config,
        socket,
        screens,
    }
}

/// A test CA (the file a device's `[sync] ca` names) and a service
/// certificate for 127.0.0.1 signed by it.
pub fn pki(dir: &Path) -> (PathBuf, dermascope_cloud::config::TlsFiles) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Dermascope test fleet CA");
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_file = dir.join("fleet-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = dermascope_cloud::config::TlsFiles {
        cert: dir.join("service-cert.pem"),
        key: dir.join("service-key.pem"),
    };
    std::fs::write(&tls.cert, cert.pem()).unwrap();
    std::fs::write(&tls.key, key.serialize_pem()).unwrap();
    (ca_file, tls)
}

/// An encoder part holding the real bundle's files (hard links where the
/// filesystem allows: the files are ~100 MB and never written).
pub fn encoder_part(bundle: &Path) {
    let src = dermascope_testkit::bundle_dir();
    let dst = bundle.join("encoder");
    std::fs::create_dir_all(&dst).unwrap();
    for name in ["manifest.toml", "encoder-fp32.onnx", "encoder-int8.onnx"] {
        if std::fs::hard_link(src.join(name), dst.join(name)).is_err() {
            std::fs::copy(src.join(name), dst.join(name)).unwrap();
        }
    }
}

/// `dermascope run` with its log collected line by line while it runs, and
/// across the starts it makes itself after an install (the same process).
pub struct LoggedDaemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    socket: PathBuf,
    watchdog: Duration,
}

impl LoggedDaemon {
    /// Runs `command` (a `dermascope run ...`), its control socket at
    /// `socket`; every wait gives up after `watchdog`.
    pub fn start(command: &mut Command, socket: &Path, watchdog: Duration) -> LoggedDaemon {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        LoggedDaemon {
            child,
            log,
            socket: socket.to_path_buf(),
            watchdog,
        }
    }

    /// Lines logged so far that hold `needle`.
    pub fn count(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `needle` was logged `times` times.
    pub fn wait_for(&mut self, needle: &str, times: usize) {
        let started = Instant::now();
        while self.count(needle) < times {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) before logging {needle:?}:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            assert!(
                started.elapsed() < self.watchdog,
                "watchdog: {needle:?} never logged {times} times:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{needle:?} x{times} after {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    /// One press of the control socket's button; its one-line reply.
    pub fn press(&self, command: &[&str]) -> String {
        let mut args = vec!["press", "--socket", s(&self.socket)];
        args.extend_from_slice(command);
        String::from_utf8_lossy(&dermascope_once(&args).stdout)
            .trim()
            .to_owned()
    }

    /// Presses until the daemon takes it (it may be starting again).
    pub fn press_until_ok(&self, command: &[&str]) {
        let started = Instant::now();
        while self.press(command) != "ok" {
            assert!(
                started.elapsed() < self.watchdog,
                "watchdog: {command:?} never taken"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Asks for a shutdown and waits for a clean exit; the whole log.
    pub fn stop(mut self) -> String {
        let _ = self.press(&["shutdown"]);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > self.watchdog {
                let _ = self.child.kill();
                panic!("watchdog: the daemon did not stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = self.log.lock().unwrap().join("\n");
        assert!(status.success(), "the daemon failed:\n{log}");
        log
    }
}

//! Network namespaces as "pods" for end-to-end tests of transparent capture:
//! [`Netns`] (deleted on drop, also on panic), a [`Lan`] of pods on one bridge
//! that lives in a namespace of its own (so the host's firewall never sees the
//! pods' frames), [`in_netns`] to run a closure (and the processes it spawns)
//! inside a namespace, small plain HTTP/TCP apps and clients, a `tcpdump`
//! capture and a reader of its pcap file.
//!
//! Names carry the test process's pid and a counter, so runs in parallel never
//! share a namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short name: `<prefix><pid % 100000>x<counter>` (at most 15 bytes
/// for the prefixes used here, so it also fits an interface name).
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `cit-<tag>…` with `lo` up.
    pub fn create(tag: &str) -> anyhow::Result<Netns> {
        let name = unique(&format!("cit-{tag}"));
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` inside the namespace (`ip netns exec`), as root; fails on a
    /// non-zero exit.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread that entered the namespace: sockets it opens and
    /// processes it spawns live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `f` on a new thread inside network namespace `name`.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = PathBuf::from("/var/run/netns").join(name);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&file)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in netns {name} panicked"))?
    })
}

/// Moves the calling thread into the network namespace `file` refers to.
#[allow(unsafe_code)]
fn enter(file: &std::fs::File) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the
    // call; it changes the namespace of this thread alone.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Pods on one bridge, `10.77.0.0/24`, the bridge in a namespace of its own.
pub struct Lan {
    /// The namespace holding the bridge `br0` (capture here to see the wire).
    pub switch: Netns,
    /// Each pod's namespace and address.
    pub pods: Vec<(Netns, Ipv4Addr)>,
}

impl Lan {
    /// The switch namespace and its bridge.
    pub fn create() -> anyhow::Result<Lan> {
        let switch = Netns::create("sw")?;
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;
        Ok(Lan {
            switch,
            pods: Vec::new(),
        })
    }

    /// A new pod namespace with `eth0` at `10.77.0.<host>/24` on the bridge;
    /// its index in [`Self::pods`].
    pub fn add_pod(&mut self, tag: &str, host: u8) -> anyhow::Result<usize> {
        let pod = Netns::create(tag)?;
        let port = format!("p{host}");
        run(
            "ip",
            &[
                "link",
                "add",
                &port,
                "netns",
                self.switch.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
        )?;
        self.switch
            .exec(&["ip", "link", "set", &port, "master", "br0", "up"])?;
        let ip = Ipv4Addr::new(10, 77, 0, host);
        pod.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        pod.exec(&["ip", "link", "set", "eth0", "up"])?;
        self.pods.push((pod, ip));
        Ok(self.pods.len() - 1)
    }
}

/// A plain HTTP/1.1 server inside `ns` on `0.0.0.0:port`: each request is
/// answered `200` with `pod=<name> xfcc=<x-forwarded-client-cert or -> path=<path>`,
/// and its head is kept in the returned log. Connections are kept alive until the
/// client asks `Connection: close`. Runs until the process ends.
pub fn http_app(
    ns: &str,
    port: u16,
    name: &'static str,
) -> anyhow::Result<std::sync::Arc<std::sync::Mutex<Vec<String>>>> {
    let listener = in_netns(ns, || std::net::TcpListener::bind(("0.0.0.0", port)))??;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let log = log.clone();
            std::thread::spawn(move || serve_http(conn, name, &log));
        }
    });
    Ok(seen)
}

fn serve_http(conn: TcpStream, name: &str, log: &std::sync::Mutex<Vec<String>>) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = std::io::BufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match std::io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            head.push_str(&line);
            if line == "\r\n" || head.len() > 65536 {
                break;
            }
        }
        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let xfcc = header("x-forwarded-client-cert").unwrap_or_else(|| "-".to_owned());
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if let Ok(mut l) = log.lock() {
            l.push(head.clone());
        }
        let body = format!("pod={name} xfcc={xfcc} path={path}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if out.write_all(answer.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// A TCP server inside `ns` on `0.0.0.0:port` echoing every byte.
pub fn echo_app(ns: &str, port: u16) -> anyhow::Result<()> {
    let listener = in_netns(ns, || std::net::TcpListener::bind(("0.0.0.0", port)))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(mut back) = conn.try_clone() else {
                    return;
                };
                let _ = std::io::copy(&mut conn, &mut back);
            });
        }
    });
    Ok(())
}

/// A plain HTTP/1.1 GET from inside `ns` (a client that knows nothing of TLS):
/// the status and body, or why there was none.
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    in_netns(ns, || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        crate::process::parse_http_response(&buf)
    })?
}

/// Sends `bytes` from inside `ns` to `addr` and reads as many back.
pub fn echo_in(ns: &str, addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    in_netns(ns, || -> anyhow::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(bytes)?;
        let mut back = vec![0u8; bytes.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })?
}

/// Polls `f` every 200 ms until it returns `Ok` or `secs` pass (then its last error).
pub fn eventually<T>(secs: u64, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A `tcpdump` writing every TCP packet on `iface` of `ns` to a pcap file (on a
/// bridge namespace use `any`: the bridge device itself does not see the unicast
/// frames it forwards between ports);
/// stopped (by its pid) on [`Self::stop`] or drop.
pub struct Capture {
    child: Child,
    /// The pcap file.
    pub file: PathBuf,
}

impl Capture {
    /// Starts it and waits until it listens.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> anyhow::Result<Capture> {
        let err = file.with_extension("err");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-U",
                "-n",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("spawning tcpdump")?;
        let mut cap = Capture {
            child,
            file: file.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let said = std::fs::read_to_string(&err).unwrap_or_default();
            if said.contains("listening on") {
                return Ok(cap);
            }
            if let Ok(Some(status)) = cap.child.try_wait() {
                anyhow::bail!("tcpdump exited ({status}): {said}");
            }
            anyhow::ensure!(Instant::now() < deadline, "tcpdump not listening: {said}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGTERM to its pid, so it flushes) and returns the TCP segments.
    pub fn stop(&mut self) -> anyhow::Result<Vec<Segment>> {
        // Let the last packets reach the file first.
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        tcp_segments(&std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One captured TCP segment with a payload.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Source.
    pub src: SocketAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// The TCP payload.
    pub payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The TCP segments with a payload in a pcap file of IPv4 packets (Ethernet or
/// Linux cooked frames).
pub fn tcp_segments(pcap: &[u8]) -> anyhow::Result<Vec<Segment>> {
    let magic = pcap.get(..4).context("pcap too short")?;
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => anyhow::bail!("not a pcap file"),
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = pcap.get(at..at + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    // Ethernet (1), Linux cooked v1 (113) or v2 (276, what `-i any` writes):
    // where the EtherType is, and where the IP header starts.
    let (ethertype_at, ip_at) = match u32_at(20) {
        Some(1) => (12, 14),
        Some(113) => (14, 16),
        Some(276) => (0, 20),
        other => anyhow::bail!("unknown link type {other:?}"),
    };
    let mut out = Vec::new();
    let mut at = 24usize;
    while let Some(incl) = u32_at(at + 8) {
        let start = at + 16;
        let end = start + incl as usize;
        let Some(frame) = pcap.get(start..end) else {
            break;
        };
        at = end;
        if be16(frame, ethertype_at) != Some(0x0800) {
            continue;
        }
        let Some(ip) = frame.get(ip_at..) else {
            continue;
        };
        let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
        let total = usize::from(be16(ip, 2).unwrap_or(0));
        if ip.get(9) != Some(&6) || ihl < 20 {
            continue;
        }
        let addr = |o: usize| -> Option<Ipv4Addr> {
            let b: [u8; 4] = ip.get(o..o + 4)?.try_into().ok()?;
            Some(Ipv4Addr::from(b))
        };
        let (Some(src), Some(dst)) = (addr(12), addr(16)) else {
            continue;
        };
        let Some(tcp) = ip.get(ihl..total.max(ihl)) else {
            continue;
        };
        let off = usize::from(tcp.get(12).copied().unwrap_or(0) >> 4) * 4;
        let (Some(sp), Some(dp)) = (be16(tcp, 0), be16(tcp, 2)) else {
            continue;
        };
        let payload = tcp.get(off..).unwrap_or_default();
        if !payload.is_empty() {
            out.push(Segment {
                src: SocketAddr::from((src, sp)),
                dst: SocketAddr::from((dst, dp)),
                payload: payload.to_vec(),
            });
        }
    }
    Ok(out)
}

/// Whether this machine can make network namespaces (root, `ip`).
pub fn netns_available() -> Result<(), String> {
    if !crate::mesh::is_root() {
        return Err("not root".to_owned());
    }
    match Netns::create("probe") {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{e:#}")),
    }
}

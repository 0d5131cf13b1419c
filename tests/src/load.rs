//! A steady load of short TCP echo exchanges through a mesh path: every exchange opens a
//! new connection (so every one is a fresh TLS handshake at each proxy on the way), writes
//! `ping` and expects it back. Counts successes and keeps the first failures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// One exchange through `addr`: connect, send `ping`, read it back within 5 s.
pub async fn echo_once(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {buf:?}")),
        Ok(Err(e)) => Err(format!("closed: {e}")),
        Err(_) => Err("no echo within 5 s".to_owned()),
    }
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

/// A running load; [`Load::stop`] ends it and returns the tally.
pub struct Load {
    name: String,
    counts: Arc<Counts>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a load did.
#[derive(Debug, Clone)]
pub struct Tally {
    /// The path's name.
    pub name: String,
    /// Exchanges that echoed.
    pub ok: u64,
    /// Exchanges that failed.
    pub failed: u64,
    /// The first few failures.
    pub first_errors: Vec<String>,
}

impl Load {
    /// Starts `workers` loops through `addr`, each starting one exchange every `every`
    /// (a slow exchange delays its loop's next one, never overlaps it).
    pub fn start(name: &str, addr: SocketAddr, workers: usize, every: Duration) -> Load {
        let counts = Arc::new(Counts::default());
        let (stop, stop_rx) = watch::channel(false);
        let tasks = (0..workers)
            .map(|_| {
                let counts = counts.clone();
                let mut stop_rx = stop_rx.clone();
                let name = name.to_owned();
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = ticks.tick() => {}
                            _ = stop_rx.wait_for(|s| *s) => return,
                        }
                        match echo_once(addr).await {
                            Ok(()) => {
                                counts.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                let mut first = counts
                                    .first_errors
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner());
                                if first.len() < 10 {
                                    first.push(format!("{name}: {e}"));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            name: name.to_owned(),
            counts,
            stop,
            tasks,
        }
    }

    /// Exchanges that echoed so far.
    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Stops every loop (letting exchanges in flight finish) and returns the tally.
    pub async fn stop(self) -> Tally {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        Tally {
            name: self.name,
            ok: self.counts.ok.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            first_errors: self
                .counts
                .first_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

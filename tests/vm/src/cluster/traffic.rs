//! Requests sent the whole time the cluster changes: each client sends one request after
//! another (short timeouts, a short pause between them), and every request counts for the
//! phase it started in.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use crate::checks::cluster::Transport;

/// One client's requests: from a namespace, to targets in turn.
pub struct Client {
    /// Its name in the report.
    pub name: String,
    /// The namespace it sends from.
    pub netns: String,
    /// The source address, if it must be a given one.
    pub source: Option<IpAddr>,
    /// What it asks, in turn.
    pub targets: Vec<(SocketAddr, Transport)>,
    /// Whether an answer is right: the pod that answered.
    pub expect: fn(&str) -> bool,
}

/// Requests and failures of one phase and client.
#[derive(Debug, Default, Clone)]
pub struct Count {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed or were answered by the wrong pod.
    pub failed: u64,
    /// The first few failures.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Shared {
    phase: Mutex<String>,
    counts: Mutex<BTreeMap<(String, String), Count>>,
    phases: Mutex<Vec<String>>,
    events: Mutex<Vec<String>>,
    stop: AtomicBool,
    started: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    fn since_start(&self) -> f64 {
        self.started.lock().expect("lock").map_or(0.0, |s| s.elapsed().as_secs_f64())
    }
}

/// The clients, running until [`Traffic::finish`].
pub struct Traffic {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// The pause between one client's requests.
const PAUSE: Duration = Duration::from_millis(20);

impl Traffic {
    /// Starts `clients`, counting for phase `phase`.
    pub fn start(clients: Vec<Client>, phase: &str) -> Self {
        let shared = Arc::new(Shared::default());
        *shared.phase.lock().expect("lock") = phase.to_owned();
        shared.phases.lock().expect("lock").push(phase.to_owned());
        *shared.started.lock().expect("lock") = Some(std::time::Instant::now());
        let threads = clients
            .into_iter()
            .map(|client| {
                let shared = shared.clone();
                std::thread::spawn(move || run(client, &shared))
            })
            .collect();
        Self { shared, threads }
    }

    /// Counts requests started from now on for `phase`.
    pub fn phase(&self, phase: &str) {
        self.event(&format!("phase: {phase}"));
        *self.shared.phase.lock().expect("lock") = phase.to_owned();
        self.shared.phases.lock().expect("lock").push(phase.to_owned());
    }

    /// Notes what the test did, at the time since the clients started (to read failures
    /// against).
    pub fn event(&self, what: &str) {
        let at = self.shared.since_start();
        self.shared.events.lock().expect("lock").push(format!("at {at:.1} s: {what}"));
    }

    /// What the test did, with times ([`Traffic::event`]).
    pub fn events(&self) -> Vec<String> {
        self.shared.events.lock().expect("lock").clone()
    }

    /// Stops the clients; the counts by phase, then client, in the phases' order.
    pub fn finish(mut self) -> Vec<(String, Vec<(String, Count)>)> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("a client thread");
        }
        let counts = self.shared.counts.lock().expect("lock").clone();
        let phases = self.shared.phases.lock().expect("lock").clone();
        phases
            .into_iter()
            .map(|phase| {
                let rows = counts
                    .iter()
                    .filter(|((p, _), _)| *p == phase)
                    .map(|((_, client), count)| (client.clone(), count.clone()))
                    .collect();
                (phase, rows)
            })
            .collect()
    }
}

fn run(client: Client, shared: &Shared) {
    let file = File::open(format!("/run/netns/{}", client.netns)).expect("namespace file");
    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
    let mut turn = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let (target, transport) = client.targets[turn % client.targets.len()];
        turn += 1;
        let phase = shared.phase.lock().expect("lock").clone();
        let result = super::request(target, transport, client.source).and_then(|reply| {
            if (client.expect)(&reply.pod) {
                Ok(())
            } else {
                Err(format!("{target} answered by {}", reply.pod))
            }
        });
        let mut counts = shared.counts.lock().expect("lock");
        let count = counts.entry((phase, client.name.clone())).or_default();
        count.requests += 1;
        if let Err(err) = result {
            count.failed += 1;
            if count.errors.len() < 5 {
                let at = shared.since_start();
                count.errors.push(format!("at {at:.1} s: {transport:?} {err}"));
            }
        }
        drop(counts);
        std::thread::sleep(PAUSE);
    }
}

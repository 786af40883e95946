//! The periodic full check's read of the IPVS table, on a thread of its own at the lowest CPU
//! priority.
//!
//! At 10,000 Services the dump takes seconds of CPU. On the runtime's worker threads it would
//! compete as an equal with the sync loop, which carries every endpoint change to the kernel;
//! on its own thread, under `SCHED_IDLE`, it takes only the CPU the loop (and the node's pods)
//! leave.
//! The thread has its own single-threaded runtime and its own IPVS sockets, opened in the
//! daemon's network namespace when the thread starts.

use std::sync::mpsc;

use controller::reconcile::{KernelDigests, read_digests};
use ipvs_netlink::IpvsHandle;
use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
    set_thread_priority_and_policy, thread_native_id,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::Error;

/// What one dump returns: each virtual server's digest.
pub type Dumped = Result<KernelDigests, ipvs_netlink::Error>;

/// The thread that reads the IPVS table for the full check.
pub struct Dumper {
    requests: mpsc::Sender<oneshot::Sender<Dumped>>,
}

impl Dumper {
    /// Starts the thread and opens its IPVS sockets; fails if either cannot be done.
    pub fn start() -> Result<Self, Error> {
        let (requests, incoming) = mpsc::channel::<oneshot::Sender<Dumped>>();
        let (opened, is_open) = mpsc::channel();
        std::thread::Builder::new()
            .name("ipvs-dump".into())
            .spawn(move || {
                // SCHED_IDLE rather than only nice 19: a CPU running nothing but this thread
                // counts as idle when a woken thread looks for a CPU, and any other thread
                // preempts it at once.
                let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
                if let Err(err) =
                    set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
                {
                    warn!(?err, "the IPVS dump thread keeps the normal CPU priority");
                }
                let runtime =
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = opened.send(Err(Error::DumpThreadStart(err)));
                            return;
                        }
                    };
                let ipvs = match runtime.block_on(async { IpvsHandle::with_small_dump_parts() }) {
                    Ok(ipvs) => ipvs,
                    Err(err) => {
                        let _ = opened.send(Err(Error::DumpThreadConnect(err)));
                        return;
                    }
                };
                let _ = opened.send(Ok(()));
                for reply in incoming {
                    let dumped = runtime.block_on(read_digests(&ipvs));
                    // The daemon may be stopping; then no one waits for the answer.
                    let _ = reply.send(dumped);
                }
                debug!("the IPVS dump thread stops");
            })
            .map_err(Error::DumpThreadStart)?;
        match is_open.recv() {
            Ok(Ok(())) => Ok(Self { requests }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::DumpThreadStopped),
        }
    }

    /// Asks for a dump of the whole table; it arrives on the receiver. If the thread has
    /// stopped, the receiver reports the sender dropped.
    pub fn dump(&self) -> oneshot::Receiver<Dumped> {
        let (reply, answer) = oneshot::channel();
        // A send fails only when the thread is gone; `reply` is dropped with the request and
        // the receiver says so.
        let _ = self.requests.send(reply);
        answer
    }
}

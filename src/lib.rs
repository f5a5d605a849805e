//! The core of `latssiam-bridge`: the gateway (`gateway`: SMTP, IRC, the
//! queue, delivery, the poller), the person's local IMAP and submission
//! bridge (`local`), and the durable TOFU pin store (`pins`).

pub mod gateway;
pub mod local;
pub mod pins;

/// Runs blocking work (file writes, fsyncs, store reads) on this thread; on
/// a multi-threaded tokio runtime the thread's other tasks move to another
/// worker meanwhile (no copy of the work's data is made for another thread).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

//! The shutdown signal, as a value every task holds (mini-redis `shutdown.rs`): listeners
//! stop accepting, idle sessions say goodbye, background workers return. Cloning is cheap;
//! the signal is given once, by [`Trigger::signal`] or by dropping the trigger.

use tokio::sync::watch;

/// Gives the shutdown signal.
pub struct Trigger(watch::Sender<bool>);

/// Waits for the shutdown signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and the first of its receivers.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn signal(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has been signalled (or its trigger is gone).
    pub async fn signalled(&mut self) {
        // The guard `wait_for` returns is not Send; it is dropped here, not in a caller's
        // select.
        let _ = self.0.wait_for(|s| *s).await;
    }
}

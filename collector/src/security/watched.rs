//! Files re-read when they change: certificates that cert-manager rotates in
//! place, the tokens, roles and JWKS files an operator edits.
//!
//! A file is stamped by (modification time, size, inode); a task compares the
//! stamp every second and loads the file again when it moved. A file that no
//! longer loads leaves the last good value in force and logs why, so a
//! half-written file never locks everyone out.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use driftwatch_proto::ops::stamp;

/// A value loaded from files, kept current.
pub struct Watched<T> {
    current: RwLock<Arc<T>>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Loads `what` from `paths` with `load` (an error is returned: a bad
    /// file at start is the operator's to fix), then watches them.
    pub fn start(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<Self>> {
        let mut seen = stamp(&paths);
        let w = Arc::new(Self {
            current: RwLock::new(Arc::new(load()?)),
        });
        let weak = Arc::downgrade(&w);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(w) = weak.upgrade() else { return };
                let now = stamp(&paths);
                if now == seen {
                    continue;
                }
                seen = now;
                match load() {
                    Ok(v) => {
                        w.set(v);
                        tracing::info!(what, files = ?paths, "re-read after a change");
                    }
                    Err(e) => tracing::error!(
                        what,
                        "changed but cannot be loaded; the previous one stays in force: {e:#}"
                    ),
                }
            }
        });
        Ok(w)
    }

    /// A value that never changes.
    pub fn fixed(v: T) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(v)),
        })
    }

    /// The value in force.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, v: T) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(v);
    }
}

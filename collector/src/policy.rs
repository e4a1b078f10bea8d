//! The policy the collector judges with and pushes to its agents.
//!
//! Loaded at start from `--policy FILE` (a bad file stops the start) and on
//! SIGHUP (a bad file is refused and the running policy stays). Every
//! agent stream watches [`Policies::subscribe`] and sends each new version.

use std::{path::PathBuf, sync::Arc};

use driftwatch_proto::policy::{self, Policy, PolicyError};
use tokio::sync::watch;

/// A policy with its text, for pushing it as written.
#[derive(Debug)]
pub struct Loaded {
    /// Parsed and validated.
    pub policy: Policy,
    /// As read.
    pub text: String,
    /// [`policy::version`] of the text.
    pub version: String,
    /// The file.
    pub source: String,
}

/// The running policy, if any.
#[derive(Clone)]
pub struct Policies {
    file: Option<PathBuf>,
    tx: Arc<watch::Sender<Option<Arc<Loaded>>>>,
}

fn load(path: &std::path::Path) -> Result<Loaded, PolicyError> {
    let (policy, text) = Policy::read(path)?;
    // Users, executables and pods are the agents' to know; what is said
    // here holds for every node.
    let host = policy::HostFacts {
        user_exists: &|_| true,
        uid_of: &|_| None,
        exe_exists: &|_| true,
        kubernetes: true,
    };
    for w in policy.warnings(&host) {
        tracing::warn!(file = %path.display(), "{w}");
    }
    Ok(Loaded {
        policy,
        version: policy::version(&text),
        text,
        source: path.display().to_string(),
    })
}

impl Policies {
    /// Loads `file` if given; an error names file, field and reason.
    pub fn open(file: Option<PathBuf>) -> Result<Self, PolicyError> {
        let current = file.as_deref().map(load).transpose()?.map(Arc::new);
        let (tx, _) = watch::channel(current);
        Ok(Self {
            file,
            tx: Arc::new(tx),
        })
    }

    /// The policy in force.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.tx.borrow().clone()
    }

    /// Follows changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Loaded>>> {
        self.tx.subscribe()
    }

    /// Re-reads the file; on error the running policy stays.
    pub fn reload(&self) -> Result<Option<String>, PolicyError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let next = load(file)?;
        let version = next.version.clone();
        let same = self.current().is_some_and(|c| c.version == next.version);
        if !same {
            self.tx.send_replace(Some(Arc::new(next)));
        }
        Ok(Some(version))
    }
}

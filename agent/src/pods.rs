//! Pod metadata from the Kubernetes API: the agent watches the pods of its
//! own node (field selector `spec.nodeName`) and maps each pod uid, which a
//! process's cgroup path carries, to the pod's name, namespace, labels and
//! service account, and each container id to the container's name and
//! image. Events then carry them, and policy selectors on them can match.
//!
//! A process whose pod is not known yet (it started before the watch saw
//! the pod, or the API is unreachable) is marked `pending`, never given
//! another pod's metadata; its later events are filled once the pod is
//! known. The watch lists, then watches from the list's resourceVersion,
//! and lists again when the API says the version is gone (410) or after an
//! error, with backoff.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use serde::Serialize;

/// What the API says about one pod.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct PodMeta {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod uid.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// Container id (without the `containerd://` scheme) → name and image,
    /// shared with every event of the container's processes.
    #[serde(skip)]
    pub containers: HashMap<String, Arc<crate::identity::ContainerMeta>>,
}

/// Whether a process's pod metadata is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// Filled from the API.
    Known,
    /// The process runs in a pod the watch has not seen (yet).
    Pending,
    /// The agent does not reach a Kubernetes API.
    NoApi,
}

impl PodState {
    /// As the API's `Process.pod_metadata` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Known => "known",
            Self::Pending => "pending",
            Self::NoApi => "no_api",
        }
    }
}

#[derive(Default)]
struct State {
    watching: bool,
    by_uid: HashMap<String, Arc<PodMeta>>,
}

/// The pods of this node, as last seen; clones share them.
#[derive(Clone, Default)]
pub struct Pods {
    state: Arc<RwLock<State>>,
}

impl Pods {
    /// The metadata of pod `uid`, and whether it is known.
    pub fn lookup(&self, uid: &str) -> (Option<Arc<PodMeta>>, PodState) {
        let s = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !s.watching {
            return (None, PodState::NoApi);
        }
        match s.by_uid.get(uid) {
            Some(p) => (Some(p.clone()), PodState::Known),
            None => (None, PodState::Pending),
        }
    }

    /// Pods known now.
    pub fn len(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_uid
            .len()
    }

    /// True when no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A container id as the kubelet reports it (`containerd://<id>`), bare.
fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, id)| id)
}

/// What the agent keeps of a pod.
pub fn meta_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<PodMeta> {
    let m = &pod.metadata;
    let uid = m.uid.clone()?;
    let spec = pod.spec.as_ref();
    let mut containers = HashMap::new();
    if let Some(status) = &pod.status {
        for list in [
            &status.container_statuses,
            &status.init_container_statuses,
            &status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            for c in list {
                if let Some(id) = c.container_id.as_deref().filter(|id| !id.is_empty()) {
                    containers.insert(
                        bare_container_id(id).to_owned(),
                        Arc::new(crate::identity::ContainerMeta {
                            name: c.name.clone(),
                            image: c.image.clone(),
                        }),
                    );
                }
            }
        }
    }
    Some(PodMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        uid,
        labels: m.labels.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        containers,
    })
}

/// Set once a Kubernetes API is configured: policy warnings about pod
/// selectors hold only without one.
static CONFIGURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this agent reads pod metadata from a Kubernetes API.
pub fn api_configured() -> bool {
    CONFIGURED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the agent finds the API.
#[derive(Debug, Clone)]
pub enum Source {
    /// In a pod: the service account's token and CA, or `KUBECONFIG`.
    Infer,
    /// A URL given on the command line (tests, or a proxy).
    Url(String),
}

/// Watches the pods of `node` and keeps `pods` current, until the process
/// exits. Returns at once (having said why) when no API can be configured.
pub async fn watch(pods: Pods, node: String, source: Source) {
    use futures_util::StreamExt as _;
    use kube::runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    };
    let config = match &source {
        Source::Infer => kube::Config::infer().await.map_err(|e| e.to_string()),
        Source::Url(url) => url
            .parse::<http::Uri>()
            .map(kube::Config::new)
            .map_err(|e| format!("{url:?}: {e}")),
    };
    let client = match config.and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("no Kubernetes API ({e}); events carry no pod metadata");
            return;
        }
    };
    pods.write().watching = true;
    CONFIGURED.store(true, std::sync::atomic::Ordering::Relaxed);
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    // A relist's pods, gathered until it is complete, then swapped in
    // whole: pods deleted meanwhile do not linger.
    let mut relist: Option<HashMap<String, Arc<PodMeta>>> = None;
    let mut failing = false;
    tracing::info!(%node, "watching this node's pods for metadata");
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist = Some(HashMap::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(r), Some(m)) = (relist.as_mut(), meta_of(&pod)) {
                    r.insert(m.uid.clone(), Arc::new(m));
                }
            }
            Ok(Event::InitDone) => {
                let r = relist.take().unwrap_or_default();
                let n = r.len();
                pods.write().by_uid = r;
                if failing {
                    tracing::info!(pods = n, "the Kubernetes API answers again");
                }
                failing = false;
                tracing::debug!(pods = n, "pods listed");
            }
            Ok(Event::Apply(pod)) => {
                if let Some(m) = meta_of(&pod) {
                    pods.write().by_uid.insert(m.uid.clone(), Arc::new(m));
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    pods.write().by_uid.remove(uid);
                }
            }
            Err(e) => {
                // The watcher backs off and lists again by itself.
                if !failing {
                    tracing::warn!("watching pods: {e}; retrying with backoff (events of pods not yet seen are marked pending)");
                }
                failing = true;
            }
        }
    }
}
